"""mamba-ssm's ``selective_scan_fn`` semantics around a core linear recurrence.

Everything here is elementwise over (batch, d_inner, L) and left to autograd;
the core (``torch_scan.scan_core`` or ``numba_scan.scan_core``) does the only
part that touches d_state:

    delta ← delta + delta_bias            (when delta_bias is given)
    delta ← softplus(delta)               (when delta_softplus)
    h_t   = exp(delta_t · A) ⊙ h_{t−1} + delta_t · B_t · u_t
    y_t   = ⟨h_t, C_t⟩ + D · u_t
    y    ← y · silu(z)                    (when z is given)

computed in float32, returned in u's dtype (last_state in float32).

Packing (``seq_idx: (batch, L)`` integer, as causal-conv1d and Mamba-2 name it):
several sequences share one batch row, and the state resets wherever
``seq_idx[b, t] != seq_idx[b, t − 1]`` — the decay is 0 at a new sequence's
first token — so each sequence is scanned exactly as in a separate call, and
no gradient crosses a boundary. ``last_state`` is then the last sequence's.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ScanCore = Callable[..., tuple[Tensor, Tensor]]
"""``core(u, dt, A, B, C, *, keep=None) -> (y, last_state)``, e.g. ``torch_scan.scan_core``."""


def check_seq_idx(seq_idx: Tensor, batch: int, L: int, device: torch.device) -> None:
    """Raise ValueError unless ``seq_idx`` is an integer (batch, L) tensor on ``device``."""
    if not isinstance(seq_idx, Tensor):
        raise ValueError(f"seq_idx must be a (batch, L) integer tensor or None, got {type(seq_idx).__name__}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise ValueError(f"seq_idx must be an integer tensor (int32), got {seq_idx.dtype}")
    if tuple(seq_idx.shape) != (batch, L):
        raise ValueError(f"seq_idx must be (batch={batch}, L={L}), got shape {tuple(seq_idx.shape)}")
    if seq_idx.device != device:
        raise ValueError(f"seq_idx is on {seq_idx.device} but the scan inputs are on {device}")


def keep_mask(seq_idx: Tensor) -> Tensor:
    """seq_idx (batch, L) integer → (batch, L) float32 decay multipliers: 0 where seq_idx changes from
    the previous token (a sequence starts), 1 elsewhere (and at t = 0, where the state is 0 anyway)."""
    keep = torch.ones(seq_idx.shape, dtype=torch.float32, device=seq_idx.device)
    keep[:, 1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).float()
    return keep


def check_shapes(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
) -> None:
    """Raise ValueError naming the first argument whose shape or dtype breaks the contract."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, d_inner, L = u.shape
    if L == 0:
        raise ValueError("u has an empty sequence (L = 0)")
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must be (d_inner={d_inner}, d_state), got shape {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported; A must be real (float32, negative)")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, d_state, L):
            raise ValueError(
                f"{name} must be (batch={batch}, d_state={d_state}, L={L}) (input-dependent), got shape {tuple(t.shape)}"
            )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (d_inner,):
            raise ValueError(f"{name} must be (d_inner={d_inner},), got shape {tuple(t.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all selective-scan inputs must be on one device, got {sorted(map(str, devices))}")


def selective_scan(
    core: ScanCore,
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
    delta_softplus: bool = False, return_last_state: bool = False, *, seq_idx: Tensor | None = None,
):
    """Selective scan with mamba-ssm semantics, the recurrence done by ``core``.

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D, delta_bias: (d_inner,); seq_idx: (batch, L) integer or None (packing, see the module
    docstring). Returns y (batch, d_inner, L) in u's dtype, or (y, last_state) with
    last_state (batch, d_inner, d_state) float32.
    """
    check_shapes(u, delta, A, B, C, D, z, delta_bias)
    keep = None
    if seq_idx is not None:
        check_seq_idx(seq_idx, u.shape[0], u.shape[2], u.device)
        keep = keep_mask(seq_idx)
    u32 = u.float()
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    args = (u32.contiguous(), dt.contiguous(), A.float().contiguous(), B.float().contiguous(), C.float().contiguous())
    y, last_state = core(*args) if keep is None else core(*args, keep=keep)
    if D is not None:
        y = y + D.float()[:, None] * u32
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, last_state) if return_last_state else y
