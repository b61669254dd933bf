"""Supervised objective: it learns stain classes from the real slide's tissue; loss and metric details."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.data.tile_dataset import TileStoreDataset
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, Trainer
from trainer.engine.optim import OptimConfig
from trainer.models import build_model
from trainer.objectives.base import StepContext
from trainer.objectives.supervised import (
    SupervisedConfig,
    SupervisedObjective,
    classification_metrics,
    is_ordinal,
)


@pytest.mark.slow
def test_tiny_model_learns_stain_classes_from_real_tissue(stain_store, tmp_path) -> None:
    train = TileStoreDataset(stain_store, split="train", require_label=True)
    val = TileStoreDataset(stain_store, split="val", require_label=True, label_map=train.label_map)
    assert (len(train), len(val)) == (12, 8) and train.region_size == 32
    torch.manual_seed(0)
    model = build_model("pixel_mamba_tiny", num_classes=2)
    objective = SupervisedObjective(model, label_map=train.label_map, config=SupervisedConfig())
    before = Trainer(
        objective, train=SlideFeed(train), val=SlideFeed(val, shuffle=False),
        optim_config=OptimConfig(lr=3e-3, weight_decay=0.05), loop_config=LoopConfig(epochs=1, progress=False),
        out_dir=tmp_path / "before", device=torch.device("cpu"),
    ).validate()
    trainer = Trainer(
        objective,
        train=SlideFeed(train, seed=0),
        val=SlideFeed(val, shuffle=False),
        optim_config=OptimConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.05),
        loop_config=LoopConfig(epochs=1, accum_steps=3, tensorboard=False, progress=False),
        out_dir=tmp_path / "run",
        device=torch.device("cpu"),
    )
    result = trainer.fit()
    after = result.validations[-1]
    assert after["accuracy"] >= 0.8 and after["balanced_accuracy"] >= 0.8, (before, after)
    assert after["loss"] < before["loss"]
    assert result.best_checkpoint is not None and result.best_metric == "balanced_accuracy"


def _ctx() -> StepContext:
    return StepContext(step=0, epoch=0, position=0, micro_step=0, accum_steps=1, device=torch.device("cpu"),
                       generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def objective() -> SupervisedObjective:
    torch.manual_seed(0)
    model = build_model("pixel_mamba_tiny", num_classes=3, region_size=16)
    return SupervisedObjective(model, label_map={"0": 0, "1": 1, "2": 2}, config=SupervisedConfig(label_smoothing=0.1))


def _sample(**extra) -> dict:
    regions = torch.randint(0, 255, (2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return {"regions": regions, "label": torch.tensor(2), "slide_id": "x", **extra}


def test_hard_labels_use_label_smoothing(objective) -> None:
    out = objective(_sample(), step_ctx=_ctx())
    logits = objective.encoder(_sample()["regions"], generator=_ctx().generator).logits
    expected = F.cross_entropy(logits[None], torch.tensor([2]), label_smoothing=0.1)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].requires_grad


def test_soft_targets_give_soft_cross_entropy(objective) -> None:
    target = torch.tensor([0.7, 0.0, 0.3])
    out = objective(_sample(target=target), step_ctx=_ctx())
    logits = objective.encoder(_sample()["regions"], generator=_ctx().generator).logits
    expected = -(target * F.log_softmax(logits, dim=-1)).sum()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_unlabelled_sample_is_an_error(objective) -> None:
    with pytest.raises(ValueError, match="slide 'x' has no label"):
        objective(_sample(label=torch.tensor(-1)), step_ctx=_ctx())


def test_metrics_pass_every_label_to_qwk() -> None:
    labels = np.array([0, 0, 1, 5])
    predictions = np.array([0, 1, 1, 4])
    metrics = classification_metrics(labels, predictions, num_classes=6)
    from sklearn.metrics import cohen_kappa_score

    assert metrics["qwk"] == pytest.approx(cohen_kappa_score(labels, predictions, weights="quadratic", labels=range(6)))
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_best_metric_defaults_follow_the_label_kind(objective) -> None:
    assert is_ordinal({"0": 0, "1": 1}) and not is_ordinal({"benign": 0, "tumour": 1})
    assert objective.default_best_metric == "qwk"
    model = build_model("pixel_mamba_tiny", num_classes=2, region_size=16)
    named = SupervisedObjective(model, label_map={"benign": 0, "tumour": 1}, config=SupervisedConfig())
    assert named.default_best_metric == "balanced_accuracy"
    assert named.checkpoint_extras()["label_map"] == {"benign": 0, "tumour": 1}


def test_model_without_head_is_refused() -> None:
    with pytest.raises(ValueError, match="head of >= 2 classes"):
        SupervisedObjective(
            build_model("pixel_mamba_tiny", region_size=16), label_map={"a": 0}, config=SupervisedConfig()
        )


def test_region_caps_limit_the_regions_seen() -> None:
    torch.manual_seed(0)
    model = build_model("pixel_mamba_tiny", num_classes=2, region_size=16)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    config = SupervisedConfig(train_regions=3, eval_regions=4)
    objective = SupervisedObjective(model, label_map={"a": 0, "b": 1}, config=config)
    regions = torch.randint(0, 255, (5, 16, 16, 3), dtype=torch.uint8)
    sample = {"regions": regions, "label": torch.tensor(1), "slide_id": "x", "index": 0}
    objective(sample, step_ctx=_ctx())
    objective.eval()
    with torch.no_grad():
        objective.validation_step(sample, device=torch.device("cpu"))
    assert seen == [3, 4]


def _batch(objective, count: int = 3):
    from trainer.data.collate import collate_samples

    samples = []
    for i in range(count):
        regions = torch.randint(0, 255, (1, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        samples.append({"regions": regions, "coords": torch.zeros((1, 2), dtype=torch.long),
                        "label": torch.tensor(i % 3), "slide_id": f"img{i}", "index": i, "position": i})
    generators = tuple(torch.Generator().manual_seed(10 + i) for i in range(count))
    ctx = StepContext(step=0, epoch=0, position=0, micro_step=0, accum_steps=count, device=torch.device("cpu"),
                      generator=generators[0], generators=generators, batch_size=count)
    return samples, collate_samples(samples), ctx


def test_a_micro_batch_is_the_mean_of_its_samples_with_their_own_generators(objective) -> None:
    samples, batch, ctx = _batch(objective)
    out = objective(batch, step_ctx=ctx)
    separate = [
        objective(s, step_ctx=StepContext(step=0, epoch=0, position=i, micro_step=0, accum_steps=3,
                                          device=torch.device("cpu"), generator=torch.Generator().manual_seed(10 + i)))
        for i, s in enumerate(samples)
    ]
    assert out["loss"].item() == pytest.approx(np.mean([o["loss"].item() for o in separate]), rel=1e-5)
    assert out["accuracy"].item() == pytest.approx(np.mean([o["accuracy"].item() for o in separate]))


def test_a_micro_batch_uses_the_models_packed_forward_where_it_exists(objective) -> None:
    import inspect

    if "segments" not in inspect.signature(objective.encoder.forward).parameters:
        pytest.skip("this branch's PixelMamba.forward has no `segments` (packing is added in parallel)")
    samples, batch, ctx = _batch(objective)
    packed = objective(batch, step_ctx=ctx)
    separate = [objective.encoder(s["regions"], generator=torch.Generator().manual_seed(10 + i)).logits
                for i, s in enumerate(samples)]
    expected = F.cross_entropy(torch.stack(separate).float(), batch["label"], label_smoothing=0.1)
    assert packed["loss"].item() == pytest.approx(expected.item(), rel=1e-4)
