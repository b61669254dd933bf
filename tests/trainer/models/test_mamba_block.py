"""Bidirectional Mamba block: sizes, initialisation, wiring against a float64 token loop, residual wrapper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.models.mamba_block import BidirectionalMamba, MambaBlockConfig, ResidualMambaBlock


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("d_model", "expected"),
    # REFERENCE_NOTES: ~9.1k at 24, 25.6k at 48, 81k at 96, 282k at 192, 1.04M at 384.
    [(24, 9_144), (48, 25_584), (96, 81_120), (192, 282_048), (384, 1_043_328)],
)
def test_block_parameter_count_matches_vim_v2(d_model: int, expected: int) -> None:
    block = ResidualMambaBlock(MambaBlockConfig(d_model=d_model))
    assert _param_count(block) == expected


def test_layout_shared_projections_and_per_direction_parts() -> None:
    cfg = MambaBlockConfig(d_model=40)
    mixer = BidirectionalMamba(cfg)
    d_inner, dt_rank = 80, 3  # ceil(40 / 16)
    assert mixer.in_proj.weight.shape == (2 * d_inner, 40) and mixer.in_proj.bias is None
    assert mixer.out_proj.weight.shape == (40, d_inner) and mixer.out_proj.bias is None
    for direction in (mixer.fwd, mixer.bwd):
        assert direction.conv1d.weight.shape == (d_inner, 1, 4) and direction.conv1d.bias is not None
        assert direction.x_proj.weight.shape == (dt_rank + 32, d_inner) and direction.x_proj.bias is None
        assert direction.dt_proj.weight.shape == (d_inner, dt_rank) and direction.dt_proj.bias is not None
        assert direction.A_log.shape == (d_inner, 16) and direction.D.shape == (d_inner,)
    assert mixer.fwd.A_log is not mixer.bwd.A_log


def test_standard_mamba_initialisation() -> None:
    torch.manual_seed(0)
    cfg = MambaBlockConfig(d_model=64)
    mixer = BidirectionalMamba(cfg)
    for direction in (mixer.fwd, mixer.bwd):
        expected_a_log = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(128, 16)
        torch.testing.assert_close(direction.A_log.data, expected_a_log)
        assert torch.equal(direction.D.data, torch.ones(128))
        dt = F.softplus(direction.dt_proj.bias.data)
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
        assert direction.dt_proj.weight.abs().max() <= 4**-0.5  # dt_rank = 4


def test_no_weight_decay_tags_exactly_alog_d_biases_and_norm() -> None:
    block = ResidualMambaBlock(MambaBlockConfig(d_model=16))
    tagged = {name for name, p in block.named_parameters() if getattr(p, "_no_weight_decay", False)}
    expected = {"norm.weight"} | {
        f"mixer.{d}.{p}" for d in ("fwd", "bwd") for p in ("A_log", "D", "conv1d.bias", "dt_proj.bias")
    }
    assert tagged == expected


def _reference_direction(direction, x, z):
    """Float64 token loop of one direction. x, z: (d_inner, L) → (d_inner, L)."""
    p = {k: v.detach().double() for k, v in direction.state_dict().items()}
    d_inner, L = x.shape
    w = p["conv1d.weight"][:, 0]  # (d_inner, width)
    width = w.shape[1]
    xc = torch.zeros_like(x)
    for t in range(L):
        acc = p["conv1d.bias"].clone()
        for j in range(width):
            src = t - (width - 1) + j
            if src >= 0:
                acc += w[:, j] * x[:, src]
        xc[:, t] = F.silu(acc)
    A = -torch.exp(p["A_log"])
    h = torch.zeros(d_inner, A.shape[1], dtype=torch.float64)
    y = torch.zeros_like(x)
    for t in range(L):
        proj = p["x_proj.weight"] @ xc[:, t]
        r, n = direction.dt_rank, direction.d_state
        dt, b, c = proj[:r], proj[r : r + n], proj[r + n :]
        delta = F.softplus(p["dt_proj.weight"] @ dt + p["dt_proj.bias"])
        h = torch.exp(delta[:, None] * A) * h + (delta * xc[:, t])[:, None] * b[None, :]
        y[:, t] = (h @ c + p["D"] * xc[:, t]) * F.silu(z[:, t])
    return y


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_mixer_matches_float64_token_loop(backend: str) -> None:
    torch.manual_seed(1)
    cfg = MambaBlockConfig(d_model=5, d_state=4, ssm_backend=backend)
    mixer = BidirectionalMamba(cfg)
    with torch.no_grad():  # make the per-direction parameters differ from their init
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(1, 11, 5)
    out = mixer(hidden)

    h64 = hidden[0].double()
    xz = h64 @ mixer.in_proj.weight.detach().double().T  # (L, 2·d_inner)
    x, z = xz[:, :10].T, xz[:, 10:].T
    y_f = _reference_direction(mixer.fwd, x, z)
    y_b = _reference_direction(mixer.bwd, x.flip(-1), z.flip(-1)).flip(-1)
    expected = ((y_f + y_b) / 2).T @ mixer.out_proj.weight.detach().double().T
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_backward_direction_is_the_forward_on_the_flipped_sequence() -> None:
    torch.manual_seed(2)
    mixer = BidirectionalMamba(MambaBlockConfig(d_model=6, ssm_backend="torch"))
    mixer.bwd.load_state_dict(mixer.fwd.state_dict())
    hidden = torch.randn(1, 23, 6)
    # With equal direction weights the block is symmetric under reversing the sequence.
    torch.testing.assert_close(mixer(hidden.flip(1)), mixer(hidden).flip(1), rtol=1e-5, atol=1e-6)


def test_residual_block_drop_path_and_fp32_residual() -> None:
    torch.manual_seed(3)
    block = ResidualMambaBlock(MambaBlockConfig(d_model=8, drop_path=0.25, ssm_backend="torch"))
    x = torch.randn(1, 9, 8)
    torch.testing.assert_close(block(x, torch.zeros(1)), x)
    kept = block(x, torch.full((1,), 1 / 0.75))
    plain = block(x)
    torch.testing.assert_close(kept - x, (plain - x) / 0.75)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()

    draws = [block.draw_keep_scale(1, generator=torch.Generator().manual_seed(s), device=x.device) for s in range(40)]
    values = {round(float(d), 6) for d in draws}
    assert values == {0.0, round(1 / 0.75, 6)}
    assert ResidualMambaBlock(MambaBlockConfig(d_model=8)).draw_keep_scale(1, generator=None, device=x.device) is None


def test_block_backward_gives_finite_gradients_everywhere() -> None:
    torch.manual_seed(4)
    block = ResidualMambaBlock(MambaBlockConfig(d_model=3, ssm_backend="torch"))
    x = torch.randn(1, 40, 3, requires_grad=True)
    block(x).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(x.grad).all()


def test_config_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="d_model"):
        MambaBlockConfig(d_model=0)
    with pytest.raises(ValueError, match="drop_path"):
        MambaBlockConfig(d_model=4, drop_path=1.0)
    assert MambaBlockConfig(d_model=17).resolved_dt_rank == math.ceil(17 / 16)


def test_dropped_branch_still_gives_every_parameter_a_zero_gradient() -> None:
    # DDP needs a gradient for every parameter each step, dropped or not.
    block = ResidualMambaBlock(MambaBlockConfig(d_model=4, drop_path=0.5, ssm_backend="torch"))
    block(torch.randn(1, 12, 4), torch.zeros(1)).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


def test_forced_cuda_backend_runs_without_causal_conv1d(monkeypatch) -> None:
    """ssm_backend="cuda" means mamba-ssm's scan, and causal-conv1d only *if present* (it is optional)."""
    import trainer.models.mamba_block as mamba_block
    from trainer.models.ssm import conv, selective_scan_fn

    monkeypatch.setattr(conv, "_fused_causal_conv1d", None)  # mamba-ssm installed, causal-conv1d not
    scan_backends = []

    def fake_cuda_scan(*args, backend: str, **kwargs):
        scan_backends.append(backend)
        return selective_scan_fn(*args, backend="torch", **kwargs)

    monkeypatch.setattr(mamba_block, "selective_scan_fn", fake_cuda_scan)
    torch.manual_seed(4)
    mixer = BidirectionalMamba(MambaBlockConfig(d_model=4, ssm_backend="cuda"))
    reference = BidirectionalMamba(MambaBlockConfig(d_model=4, ssm_backend="torch"))
    reference.load_state_dict(mixer.state_dict())
    hidden = torch.randn(1, 9, 4)
    out = mixer(hidden)  # the conv falls back to F.conv1d instead of raising
    assert scan_backends == ["cuda", "cuda"]
    torch.testing.assert_close(out, reference(hidden))
