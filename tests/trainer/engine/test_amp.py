"""Mixed precision: fp32 on CPU whatever the recipe says; bf16 / fp16 (+ GradScaler) on CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from engine_data import ColourSlides

from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.feed import SlideFeed
from trainer.engine.loop import LoopConfig, Trainer, resolve_amp
from trainer.engine.optim import OptimConfig
from trainer.models import build_model
from trainer.objectives.supervised import SupervisedConfig, SupervisedObjective


def test_cpu_is_always_fp32() -> None:
    for amp in ("auto", "bf16", "fp16", "none"):
        assert resolve_amp(amp, torch.device("cpu")) is None


def test_auto_picks_bf16_only_where_the_gpu_has_it_natively(monkeypatch) -> None:
    cuda = torch.device("cuda")
    # a V100/T4: bf16 works only by emulation, so "auto" must take fp16 (+ GradScaler)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100
    assert resolve_amp("auto", cuda) == torch.bfloat16
    assert resolve_amp("fp16", cuda) == torch.float16 and resolve_amp("none", cuda) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_trains_and_checkpoints_the_scaler(amp, tmp_path) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("pixel_mamba_tiny", num_classes=2, region_size=16, ssm_backend="torch")
    objective = SupervisedObjective(model, label_map={"a": 0, "b": 1}, config=SupervisedConfig())
    trainer = Trainer(
        objective, train=SlideFeed(ColourSlides(4)), val=SlideFeed(ColourSlides(2, offset=50), shuffle=False),
        optim_config=OptimConfig(lr=1e-3), loop_config=LoopConfig(epochs=1, accum_steps=2, amp=amp, progress=False),
        out_dir=tmp_path, device=device,
    )
    assert trainer.amp_dtype == (torch.bfloat16 if amp == "bf16" else torch.float16)
    result = trainer.fit()
    assert all(math.isfinite(row["loss"]) for row in result.history) and len(result.history) == 2
    payload = load_checkpoint(result.last_checkpoint)
    assert (payload["scaler"] is not None) == (amp == "fp16")
    assert all(v.dtype == torch.float32 for v in payload["model"].values() if v.is_floating_point())
