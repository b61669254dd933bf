"""`pm-train supervised`: clear errors, a store run with resume and mismatch refusal, image-folder mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer.cli import augment_configs, main
from trainer.data.image_folder import make_tiny_image_folder

FAST = ["--model", "pixel_mamba_tiny", "--workers", "0", "--accum", "2", "--device", "cpu"]


def run(*args: str):
    return CliRunner().invoke(main, ["supervised", *args], catch_exceptions=False)


def test_missing_store(tmp_path) -> None:
    result = run("--store", str(tmp_path / "nowhere.zarr"), "--out", str(tmp_path / "run"), *FAST)
    assert result.exit_code != 0 and "does not exist" in result.output and "Traceback" not in result.output


def test_folder_that_is_not_a_store(tmp_path) -> None:
    (tmp_path / "plain").mkdir()
    result = run("--store", str(tmp_path / "plain"), "--out", str(tmp_path / "run"), *FAST)
    assert result.exit_code != 0 and "cannot open store" in result.output


def test_store_without_labels(unlabelled_store, tmp_path) -> None:
    result = run("--store", str(unlabelled_store), "--out", str(tmp_path / "run"), *FAST)
    assert result.exit_code != 0 and "has no slide labels" in result.output


def test_unknown_model_lists_the_known_ones(stain_store, tmp_path) -> None:
    result = run("--store", str(stain_store), "--out", str(tmp_path / "run"), *FAST, "--model", "pixel_mamba_9000")
    assert result.exit_code != 0
    assert "unknown model 'pixel_mamba_9000'" in result.output and "pixel_mamba_tiny" in result.output


def test_no_slides_after_filtering(stain_store, tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[data]\nmin_regions = 100\n")
    result = run("--store", str(stain_store), "--out", str(tmp_path / "run"), "--config", str(recipe), *FAST)
    assert result.exit_code != 0 and "no labelled slides in split 'train' with 100..999 regions" in result.output


def test_recipe_typo_is_named(stain_store, tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[loop]\nepoch = 3\n")
    result = run("--store", str(stain_store), "--out", str(tmp_path / "run"), "--config", str(recipe), *FAST)
    assert result.exit_code != 0 and "unknown key(s) ['epoch']" in result.output


def test_store_run_resume_and_mismatch(stain_store, other_mpp_store, tmp_path) -> None:
    out = tmp_path / "run"
    first = run("--store", str(stain_store), "--out", str(out), *FAST, "--max-steps", "1", "--epochs", "2")
    assert first.exit_code == 0, first.output
    assert "last checkpoint:" in first.output and str((out / "last.pt").resolve()) in first.output
    payload = torch.load(out / "last.pt", weights_only=True)
    assert (payload["step"], payload["region_size"], payload["mpp"]) == (1, 32, 2.0)
    assert payload["label_map"] == {"dab": 0, "he": 1} and payload["config"]["model"]["name"] == "pixel_mamba_tiny"
    assert payload["normalization"]["mean"] and payload["model_config"]["region_size"] == 32

    refused = run("--store", str(other_mpp_store), "--out", str(tmp_path / "other"), *FAST,
                  "--resume", str(out / "last.pt"))
    assert refused.exit_code != 0
    assert ("checkpoint was trained on 32 px regions at 2 µm/px, store has 32 px regions at 1 µm/px"
            in refused.output)
    refused = run("--store", str(other_mpp_store), "--out", str(tmp_path / "other"), *FAST,
                  "--init", str(out / "last.pt"))
    assert refused.exit_code != 0 and "--init: checkpoint was trained on" in refused.output

    resumed = run("--store", str(stain_store), "--out", str(out), "--resume", str(out / "last.pt"),
                  "--max-steps", "2", "--workers", "0", "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2

    again = run("--store", str(stain_store), "--out", str(out), *FAST, "--max-steps", "1")
    assert again.exit_code != 0 and "already holds a run" in again.output and "--resume" in again.output
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2  # the earlier run is untouched
    fresh = run("--store", str(stain_store), "--out", str(out), *FAST, "--max-steps", "1", "--overwrite")
    assert fresh.exit_code == 0 and torch.load(out / "last.pt", weights_only=True)["step"] == 1


def test_init_from_checkpoint_reports_fresh_head(stain_store, tmp_path) -> None:
    first = run("--store", str(stain_store), "--out", str(tmp_path / "a"), *FAST, "--max-steps", "1")
    assert first.exit_code == 0, first.output
    second = run("--store", str(stain_store), "--out", str(tmp_path / "b"), *FAST, "--max-steps", "1",
                 "--init", str(tmp_path / "a" / "last.pt"), "--balance-classes", "--lr", "1e-3", "--seed", "3")
    assert second.exit_code == 0, second.output
    assert "--init: loaded encoder weights; fresh head (2 head keys left out)" in second.output
    config = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["config"]
    assert config["data"]["balance_classes"] is True and config["optim"]["lr"] == 1e-3 and config["loop"]["seed"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu(stain_store, tmp_path) -> None:
    result = run("--store", str(stain_store), "--out", str(tmp_path / "r"), "--device", "cuda")
    assert result.exit_code != 0 and "no CUDA device is available" in result.output


def test_image_folder_mode(tmp_path) -> None:
    make_tiny_image_folder(tmp_path / "train", classes=2, per_class=3, size=24)
    make_tiny_image_folder(tmp_path / "val", classes=2, per_class=1, size=24, seed=1)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        "[data]\nregion_size = 16\n[supervised]\nlabel_smoothing = 0.1\n"
        "[augment]\nscale = [0.5, 1.0]\n[augment.mix]\nmixup_alpha = 0.8\n"
    )
    out = tmp_path / "run"
    result = run("--image-folder", str(tmp_path / "train"), "--val-folder", str(tmp_path / "val"), "--out", str(out),
                 "--config", str(recipe), *FAST, "--accum", "3", "--epochs", "1")
    assert result.exit_code == 0, result.output
    payload = torch.load(out / "last.pt", weights_only=True)
    assert payload["mpp"] is None and payload["region_size"] == 16 and payload["step"] == 2
    assert payload["model_config"]["region_fusion"] is False
    assert (out / "best.pt").exists() and (out / "metrics.csv").read_text().count("\nval,") == 1
    assert list(Path(out / "tensorboard").iterdir())


def test_store_and_image_folder_are_exclusive(stain_store, tmp_path) -> None:
    result = run("--store", str(stain_store), "--image-folder", str(tmp_path), "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code != 0 and "exactly one of --store" in result.output


@pytest.mark.parametrize("recipe", sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.toml")))
def test_shipped_recipes_parse(recipe) -> None:
    from trainer.engine.config import DataConfig, load_recipe, section
    from trainer.engine.loop import LoopConfig
    from trainer.engine.optim import OptimConfig
    from trainer.models import get_config
    from trainer.objectives.supervised import SupervisedConfig

    loaded = load_recipe(recipe)
    for table, cls in (("data", DataConfig), ("optim", OptimConfig), ("loop", LoopConfig),
                       ("supervised", SupervisedConfig)):
        section(loaded, table, cls, source=recipe.name)
    model = dict(loaded["model"])
    get_config(model.pop("name"), **model)
    augment, mix = augment_configs(loaded)
    if "augment" in loaded:
        assert augment.rand_augment is not None and mix is not None and mix.label_smoothing == 0.1


def test_resume_refuses_another_input_normalisation(stain_store, tmp_path) -> None:
    out = tmp_path / "run"
    first = run("--store", str(stain_store), "--out", str(out), *FAST, "--max-steps", "1", "--epochs", "2")
    assert first.exit_code == 0, first.output
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\npixel_mean = [0.5, 0.5, 0.5]\n")
    resumed = run("--store", str(stain_store), "--out", str(out), "--resume", str(out / "last.pt"),
                  "--config", str(recipe), "--max-steps", "2", "--workers", "0", "--device", "cpu")
    assert resumed.exit_code != 0 and "--resume: checkpoint normalises inputs with mean" in resumed.output
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1


# ---------------------------------------------------------------- generic CLI over the objectives registry
from dataclasses import dataclass  # noqa: E402

from trainer.cli import _command_for  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.objectives import OBJECTIVES, ObjectiveSpec  # noqa: E402
from trainer.objectives.base import Objective, make_teacher  # noqa: E402
from trainer.schedules import CosineSchedule  # noqa: E402


def test_every_registered_objective_is_a_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert all(name in result.output for name in OBJECTIVES)


@dataclass(frozen=True, kw_only=True)
class FakeSSLConfig:
    momentum: float = 0.9


class FakeSSL(Objective):
    """Student vs EMA teacher embeddings of the same regions (a minimal teacher-student objective)."""

    name = "fake_ssl"
    requires_labels = False
    export_source = "teacher"
    has_validation = True

    def __init__(self, encoder, config: FakeSSLConfig) -> None:
        super().__init__()
        self.encoder, self.config = encoder, config
        self.teacher = make_teacher(encoder)

    def ema_pairs(self):
        return [(self.teacher, self.encoder)]

    def exported_encoder(self):
        return self.teacher

    def schedules(self, plan):
        return {"ema_momentum": CosineSchedule(base=self.config.momentum, final=1.0, total_steps=plan.total_steps)}

    def forward(self, sample, *, step_ctx):
        student = self.encoder(sample["regions"], generator=step_ctx.generator).embedding
        with torch.no_grad():
            target = self.teacher(sample["regions"]).embedding
        return {"loss": 1 - torch.cosine_similarity(student, target, dim=0)}

    def validation_step(self, sample, *, device):
        return {"index": int(sample["index"]), "norm": float(self.teacher(sample["regions"]).embedding.norm())}

    def validation_metrics(self, records):
        return {"mean_norm": sum(r["norm"] for r in records) / len(records)}


def _fake_spec() -> ObjectiveSpec:
    return ObjectiveSpec(name="fake_ssl", config_cls=FakeSSLConfig, build=lambda enc, cfg, ctx: FakeSSL(enc, cfg),
                         summary="A fake teacher-student objective.", objective_cls=FakeSSL)


def test_an_ssl_objective_plugs_in_without_cli_code(unlabelled_store, stain_store, monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(OBJECTIVES, "fake_ssl", _fake_spec)
    monkeypatch.setitem(main.commands, "fake_ssl", _command_for("fake_ssl", "fake"))
    out = tmp_path / "ssl"
    args = ["fake_ssl", "--store", str(unlabelled_store), "--store", str(stain_store), "--out", str(out), *FAST,
            "--epochs", "1", "--set", "fake_ssl.momentum=0.5", "--set", "data.val_split=\"val\"",
            "--best-metric", "mean_norm", "--precrop-regions", "3"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    payload = torch.load(out / "last.pt", weights_only=True)
    assert payload["objective_name"] == "fake_ssl" and payload["model_source"] == "teacher"
    assert set(payload["student"]) == set(payload["model"]) and payload["config"]["fake_ssl"]["momentum"] == 0.5
    assert payload["samples_per_epoch"] == 4 + 12  # unlabelled slides train too
    assert (out / "best.pt").exists() and "best checkpoint:" in result.output and "mean_norm" in result.output
    assert "4 of 16 training slides have no label" in result.output
    init = run("--store", str(stain_store), "--out", str(tmp_path / "sup"), *FAST, "--max-steps", "1",
               "--init", str(out / "last.pt"))
    assert init.exit_code == 0 and "(the checkpoint's teacher, pixel_mamba_tiny)" in init.output


def test_set_overrides_and_their_errors(stain_store, tmp_path) -> None:
    out = tmp_path / "run"
    ok = run("--store", str(stain_store), "--out", str(out), *FAST, "--max-steps", "1",
             "--set", "supervised.label_smoothing=0.2", "--set", "loop.log_every=1")
    assert ok.exit_code == 0, ok.output
    assert torch.load(out / "last.pt", weights_only=True)["config"]["supervised"]["label_smoothing"] == 0.2
    bad = run("--store", str(stain_store), "--out", str(tmp_path / "b"), *FAST, "--set", "nowhere.x=1")
    assert bad.exit_code != 0 and "unknown section 'nowhere'" in bad.output
    bad = run("--store", str(stain_store), "--out", str(tmp_path / "b"), *FAST, "--set", "loop.epochs")
    assert bad.exit_code != 0 and "expected section.key=value" in bad.output
    bad = run("--store", str(stain_store), "--out", str(tmp_path / "b"), *FAST, "--best-metric", "qwk")
    assert bad.exit_code != 0 and "'qwk' is not a validation metric" in bad.output  # he/dab are not ordinal


def test_unknown_validation_split_is_refused_listing_the_stores(stain_store, tmp_path) -> None:
    result = run("--store", str(stain_store), "--out", str(tmp_path / "r"), *FAST, "--val-split", "validation")
    assert result.exit_code != 0
    assert "validation split 'validation' is not in the store; its splits are 'train', 'val'" in result.output


def test_stores_of_another_resolution_are_refused(stain_store, other_mpp_store, tmp_path) -> None:
    result = run("--store", str(stain_store), "--store", str(other_mpp_store), "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code != 0 and "stores must share one MPP and region size" in result.output


def test_fold_of_a_case_grouped_cross_validation(stain_store, tmp_path) -> None:
    out = tmp_path / "fold"
    result = run("--store", str(stain_store), "--out", str(out), *FAST, "--fold", "1", "--folds", "4",
                 "--epochs", "1", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert "15 training samples, 5 validation" in result.output  # 20 labelled slides, 4 folds
    assert "qwk" not in (out / "metrics.csv").read_text().splitlines()[0]


def test_overwrite_removes_the_earlier_run_and_finished_runs_say_so(stain_store, tmp_path) -> None:
    out = tmp_path / "run"
    first = run("--store", str(stain_store), "--out", str(out), *FAST, "--epochs", "1", "--set", "loop.tensorboard=true")
    assert first.exit_code == 0 and (out / "best.pt").exists() and (out / "tensorboard").exists()
    again = run("--store", str(stain_store), "--out", str(out), "--resume", str(out / "last.pt"), "--device", "cpu")
    assert again.exit_code == 0 and "nothing to do: the run in" in again.output
    fresh = run("--store", str(stain_store), "--out", str(out), *FAST, "--max-steps", "1", "--overwrite",
                "--set", "loop.tensorboard=false")
    assert fresh.exit_code == 0, fresh.output
    assert not (out / "best.pt").exists() and not (out / "tensorboard").exists()


def test_init_with_another_variant_names_it_and_the_flag(stain_store, tmp_path) -> None:
    model = build_model("pixel_mamba_tiny", num_classes=2, region_size=32, d_state=4)
    torch.save({"model": model.state_dict(), "model_name": "pixel_mamba_other", "region_size": 32, "mpp": 2.0},
               tmp_path / "other.pt")
    result = run("--store", str(stain_store), "--out", str(tmp_path / "r"), *FAST, "--init", str(tmp_path / "other.pt"))
    assert result.exit_code != 0
    assert "holds a pixel_mamba_other encoder, this run builds pixel_mamba_tiny; pass --model pixel_mamba_other" in result.output


def test_the_memory_estimate_refuses_a_step_that_cannot_fit(stain_store, tmp_path, monkeypatch) -> None:
    from trainer.engine import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**28)  # 256 MiB
    result = run("--store", str(stain_store), "--out", str(tmp_path / "r"), *FAST, "--max-steps", "1")
    assert result.exit_code != 0 and "it will not fit" in result.output and "--precrop-regions" in result.output
    forced = run("--store", str(stain_store), "--out", str(tmp_path / "r"), *FAST, "--max-steps", "1", "--force")
    assert forced.exit_code == 0 and "running anyway (--force)" in forced.output


def test_image_folder_micro_batches_count_samples(tmp_path) -> None:
    make_tiny_image_folder(tmp_path / "train", classes=2, per_class=4, size=24)
    recipe = tmp_path / "r.toml"
    recipe.write_text("[data]\nregion_size = 16\n")
    out = tmp_path / "run"
    result = run("--image-folder", str(tmp_path / "train"), "--out", str(out), "--config", str(recipe), *FAST,
                 "--accum", "4", "--batch-size", "2", "--epochs", "1")
    assert result.exit_code == 0, result.output
    payload = torch.load(out / "last.pt", weights_only=True)
    assert payload["step"] == 2 and payload["settings"]["batch_size"] == 2  # 8 images, 4 per optimizer step
    bad = run("--image-folder", str(tmp_path / "train"), "--out", str(tmp_path / "bad"), "--config", str(recipe),
              *FAST, "--accum", "3", "--batch-size", "2")
    assert bad.exit_code != 0 and "must be a multiple of" in bad.output


def test_an_objectives_minimum_slide_size_raises_the_region_floor() -> None:
    from trainer.engine.config import DataConfig
    from trainer.launch import LaunchError, _with_objective_floor
    from trainer.objectives import OBJECTIVES

    spec = OBJECTIVES["latentmim"]()  # a visible and a target region: 2 at least
    notes: list[str] = []
    assert _with_objective_floor(DataConfig(store="s", min_regions=1), spec, notes).min_regions == 2
    assert notes and "min_regions 1 → 2" in notes[0]
    assert _with_objective_floor(DataConfig(store="s", min_regions=4), spec, []).min_regions == 4
    with pytest.raises(LaunchError, match="--precrop-regions 1"):
        _with_objective_floor(DataConfig(store="s", precrop_regions=1), spec, [])
