"""Pixel-Mamba network: table A.1, outputs, gradients, determinism, checkpointing, backends."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.models import PixelMamba, PixelMambaConfig, build_model
from trainer.models.mamba_block import ResidualMambaBlock
from trainer.models.region_fusion import RegionFusion
from trainer.models.ssm import resolve_backend
from trainer.models.token_expansion import TokenExpansion

# Table A.1 (thesis appendix): token size (rows × cols px), channels, and the TE after each layer.
TABLE_A1 = [
    ((1, 1), 3, "H-Cat"), ((1, 2), 6, "V-Cat"), ((2, 2), 12, "H-Cat"), ((2, 4), 24, "V-Cat"),
    ((4, 4), 48, "-"), ((4, 4), 48, "H-Cat"), ((4, 8), 96, "-"), ((4, 8), 96, "V-Cat"),
    ((8, 8), 192, "-"), ((8, 8), 192, "-"), ((8, 8), 192, "H-Avg"), ((8, 16), 192, "-"),
    ((8, 16), 192, "-"), ((8, 16), 192, "V-Avg"), ((16, 16), 192, "-"), ((16, 16), 192, "-"),
    ((16, 16), 192, "-"), ((16, 16), 192, "-"), ((16, 16), 192, "-"), ((16, 16), 192, "H-Avg"),
    ((16, 32), 192, "-"), ((16, 32), 192, "V-Cat"), ((32, 32), 384, "-"), ((32, 32), 384, "-"),
]  # fmt: skip


def _regions(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def _tiny(**overrides) -> PixelMamba:
    torch.manual_seed(0)
    return build_model("pixel_mamba_tiny", **overrides)


def test_pixel_mamba_6m_is_table_a1() -> None:
    model = build_model("pixel_mamba_6m")
    cfg = model.config
    assert cfg.num_layers == 24 and len(model.layers) == 24
    assert cfg.layer_token_sizes() == [row[0] for row in TABLE_A1]
    assert cfg.layer_channels() == [row[1] for row in TABLE_A1]
    assert [spec.label for spec in cfg.layers] == [row[2] for row in TABLE_A1]
    for layer, (_, width, te) in zip(model.layers, TABLE_A1):
        assert [type(m) for m in layer.children()] == (
            [ResidualMambaBlock, RegionFusion] + ([TokenExpansion] if te != "-" else [])
        )
        assert layer.block.cfg.d_model == width and layer.block.norm.weight.shape == (width,)
        if te != "-":
            direction, merge = te.lower().split("-")
            assert (layer.expansion.direction, layer.expansion.merge) == (direction, merge)
    assert cfg.final_grid == (7, 7) and model.embed_dim == 384
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 6_264_210  # stated in docs/models.md
    assert abs(n_params - 6.2e6) / 6.2e6 < 0.05
    drop = [layer.block.cfg.drop_path for layer in model.layers]
    assert drop[0] == 0.0 and drop[-1] == pytest.approx(0.1) and drop == sorted(drop)


def test_region_size_must_divide_by_the_schedules_token_size() -> None:
    with pytest.raises(ValueError, match=r"not divisible.*32×32"):
        build_model("pixel_mamba_6m", region_size=100)
    assert build_model("pixel_mamba_6m", region_size=64).config.final_grid == (2, 2)


def test_forward_outputs_without_fusion() -> None:
    model = _tiny(region_fusion=False, num_classes=3).eval()
    x = _regions(3)
    out = model(x)
    assert out.cls_tokens.shape == (3, 24) and out.spatial_tokens.shape == (3, 8, 8, 24)
    assert out.region_ids.tolist() == [0, 1, 2] and out.assignment.tolist() == [0, 1, 2]
    torch.testing.assert_close(out.embedding, out.cls_tokens.mean(0))
    assert out.logits.shape == (3,)
    torch.testing.assert_close(out.logits, model.head(out.embedding))
    assert out.cls_tokens.dtype == torch.float32
    # float input scaled to [0, 1] is the same as uint8 input
    torch.testing.assert_close(model(x.float() / 255).cls_tokens, out.cls_tokens)
    assert _tiny().config.num_classes == 0 and _tiny().eval()(x).logits is None


def test_forward_outputs_with_fusion_are_consistent() -> None:
    model = _tiny(fusion_alpha=0.5).eval()  # L = 6: 8 → 7 → 6 → 5 → 4 → 3 → 2 regions
    out = model(_regions(8))
    m = out.cls_tokens.shape[0]
    assert m == 2 and out.spatial_tokens.shape == (2, 8, 8, 24)
    assert out.assignment.shape == (8,) and out.assignment.max() == m - 1
    assert torch.equal(out.assignment[out.region_ids], torch.arange(m))  # a survivor's id maps to itself
    assert out.region_ids.tolist() == sorted(out.region_ids.tolist())
    off = model(_regions(8), region_fusion=False)
    assert off.cls_tokens.shape == (8, 24)


def test_forward_backward_gives_finite_gradients_for_every_parameter() -> None:
    # drop_path_rate 0: a dropped block's branch is multiplied by 0, so its gradients would be all zero.
    model = _tiny(num_classes=2, drop_path_rate=0.0, fusion_alpha=0.5).train()
    out = model(_regions(4), generator=torch.Generator().manual_seed(0))
    loss = out.logits.logsumexp(0) + out.spatial_tokens.square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_same_input_and_seed_give_the_same_output() -> None:
    model = _tiny(drop_path_rate=0.3).train()
    x = _regions(6)
    a = model(x, generator=torch.Generator().manual_seed(7))
    b = model(x, generator=torch.Generator().manual_seed(7))
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        assert (va is None and vb is None) or torch.equal(va, vb), f.name
    torch.manual_seed(1)
    e1 = model.eval()(x)
    torch.manual_seed(2)
    e2 = model(x)
    assert torch.equal(e1.cls_tokens, e2.cls_tokens) and torch.equal(e1.region_ids, e2.region_ids)


def test_checkpointing_matches_plain_forward_and_gradients() -> None:
    plain = _tiny(num_classes=2, drop_path_rate=0.5).train()
    ckpt = PixelMamba(dataclasses.replace(plain.config, checkpoint_layers=4)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = _regions(5)
    results = []
    for model in (plain, ckpt):
        out = model(x, generator=torch.Generator().manual_seed(3))
        (out.logits.sum() + out.cls_tokens.square().sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b.cls_tokens, out_a.cls_tokens, rtol=0, atol=0)
    assert torch.equal(out_a.assignment, out_b.assignment)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)


def test_bad_input_gets_a_clear_error() -> None:
    model = _tiny().eval()
    with pytest.raises(ValueError, match="region_size=32"):
        model(_regions(2, size=16))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(32, 32, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(2, 32, 32, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="n ≥ 1"):
        model(torch.zeros(0, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="checkpoint_layers"):
        PixelMambaConfig(checkpoint_layers=25)
    with pytest.raises(ValueError, match="ssm_backend"):
        PixelMambaConfig(ssm_backend="mamba")


def test_full_6m_schedule_runs_on_small_regions() -> None:
    torch.manual_seed(0)
    model = build_model("pixel_mamba_6m", region_size=32, num_classes=2).eval()
    out = model(_regions(2))
    assert out.spatial_tokens.shape == (1, 1, 1, 384)  # 2 regions fuse into one at layer 1
    assert out.assignment.tolist() == [0, 0] and torch.isfinite(out.logits).all()


def test_numba_and_torch_backends_agree_on_the_model() -> None:
    if resolve_backend("auto", "cpu") != "numba":
        pytest.skip("numba backend unavailable")
    a = _tiny(ssm_backend="torch").eval()
    b = PixelMamba(dataclasses.replace(a.config, ssm_backend="numba")).eval()
    b.load_state_dict(a.state_dict())
    x = _regions(3)
    torch.testing.assert_close(b(x).cls_tokens, a(x).cls_tokens, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_the_residual_stream_in_fp32_and_stays_close() -> None:
    model = _tiny(num_classes=2, region_fusion=False).eval()
    x = _regions(2)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.spatial_tokens.dtype == torch.float32 and out.cls_tokens.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(out.spatial_tokens.flatten(0, 2), ref.spatial_tokens.flatten(0, 2))
    assert cos.min() > 0.98
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, generator=torch.Generator().manual_seed(0))
    out.logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
def test_cuda_forward_matches_cpu_and_runs_under_bf16_autocast() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = _tiny(ssm_backend="torch", num_classes=2).eval()
    x = _regions(4)
    ref = cpu(x)
    backends = ["torch"]
    for name in ("cuda", "triton"):
        try:
            resolve_backend(name, "cuda")
            backends.append(name)
        except RuntimeError:
            pass
    for backend in backends:
        gpu = PixelMamba(dataclasses.replace(cpu.config, ssm_backend=backend)).cuda().eval()
        gpu.load_state_dict(cpu.state_dict())
        out = gpu(x.cuda())
        torch.testing.assert_close(out.cls_tokens.cpu(), ref.cls_tokens, rtol=1e-3, atol=1e-4, msg=backend)
        gpu.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(x.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
        out.logits.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None), backend
