"""The float64 reference every selective-scan backend is checked against, and the checks themselves
(used by test_ssm.py and, in its interpreter child process, triton_interpreter_cases.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, seq_idx=None):
    """mamba-ssm semantics one token at a time in float64; with ``seq_idx`` (batch, L) the state restarts
    where it changes. u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L).
    Returns (y (batch, d_inner, L), last_state (batch, d_inner, d_state)), both float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, L = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None]
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * u[:, :, t, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def values_and_grads(fn, x: dict, gy: torch.Tensor, glast: torch.Tensor | None, **kw):
    """(y, last, {name: grad}) of ``fn(**x, **kw)`` → (y, last) for loss = ⟨y, gy⟩ + ⟨last, glast⟩;
    entries of x that are None are passed as None and get no gradient."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    y, last = fn(**leaves, **kw)
    loss = (y.double() * gy).sum()
    if glast is not None:
        loss = loss + (last.double() * glast).sum()
    loss.backward()
    return y.detach(), last.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def assert_float32_matches(result, reference, *, value_tol: float = 1e-5, grad_tol: float = 1e-4) -> None:
    """A float32 run's (y, last, grads) against the float64 reference's: dtypes, the same gradients,
    norm-relative errors within the tolerances."""
    (y, last, grads), (y_ref, last_ref, g_ref) = result, reference
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_err(y, y_ref) < value_tol
    assert rel_err(last, last_ref) < value_tol
    assert set(grads) == set(g_ref)
    for name in g_ref:
        assert grads[name].dtype == torch.float32, name
        assert rel_err(grads[name], g_ref[name]) < grad_tol, name
