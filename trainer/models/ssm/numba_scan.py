"""Fused CPU selective-scan core in numba: one sequential native loop per channel.

Same contract as ``torch_scan.scan_core``. Forward runs a parallel loop over
(batch × d_inner) channels, each sequential over L with its d_state state in a
local array, and records the state every ``CHECKPOINT_EVERY`` tokens. Backward
walks each channel's segments in reverse: it recomputes the segment's states
from its checkpoint into a (K + 1, d_state) buffer, then runs the adjoint
recurrence token by token. Memory: O(L/K · d_inner · d_state) checkpoints plus
O(K · d_state) per thread; dB and dC are reduced over d_inner through one
(batch, L, d_state) partial per thread group. Packed sequences: every decay is
multiplied by ``keep[b, t]`` (0 at a sequence's first token, else 1), so the
state, and in backward the adjoint, reset there.

Importing this module never fails: without numba, ``AVAILABLE`` is False and
``UNAVAILABLE_REASON`` says why.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

CHECKPOINT_EVERY = 256

try:
    import numba
    from numba import njit, prange
except Exception as exc:  # any failure to import numba/llvmlite means: no numba backend
    AVAILABLE = False
    UNAVAILABLE_REASON = f"numba could not be imported ({type(exc).__name__}: {exc})"
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

    @njit(parallel=True, cache=True)
    def _forward_kernel(u, dt, A, Bt, Ct, keep, K, y, last, ckpt):  # pragma: no cover - compiled
        nb, nd, L = u.shape
        n = A.shape[1]
        for job in prange(nb * nd):
            bi = job // nd
            di = job % nd
            h = np.zeros(n, np.float32)
            for t in range(L):
                if t % K == 0:
                    ckpt[bi, di, t // K, :] = h
                dtt = dt[bi, di, t]
                dtu = dtt * u[bi, di, t]
                kt = keep[bi, t]
                acc = np.float32(0.0)
                for k in range(n):
                    hk = np.exp(dtt * A[di, k]) * kt * h[k] + dtu * Bt[bi, t, k]
                    h[k] = hk
                    acc += hk * Ct[bi, t, k]
                y[bi, di, t] = acc
            last[bi, di, :] = h

    @njit(parallel=True, cache=True)
    def _backward_kernel(u, dt, A, Bt, Ct, keep, gy, glast, ckpt, K, ng, du, ddt, dA_part, dB_part, dC_part):  # pragma: no cover
        nb, nd, L = u.shape
        n = A.shape[1]
        nk = ckpt.shape[2]
        for job in prange(nb * ng):
            bi = job // ng
            gi = job % ng
            hs = np.empty((K + 1, n), np.float32)
            decay = np.empty((K, n), np.float32)
            g = np.empty(n, np.float32)
            dA_acc = np.empty(n, np.float64)
            for di in range(gi, nd, ng):
                for k in range(n):
                    g[k] = glast[bi, di, k]
                    dA_acc[k] = 0.0
                for s in range(nk - 1, -1, -1):
                    t0 = s * K
                    t1 = min(t0 + K, L)
                    for k in range(n):
                        hs[0, k] = ckpt[bi, di, s, k]
                    for t in range(t0, t1):
                        j = t - t0
                        dtt = dt[bi, di, t]
                        dtu = dtt * u[bi, di, t]
                        kt = keep[bi, t]
                        for k in range(n):
                            a = np.exp(dtt * A[di, k]) * kt
                            decay[j, k] = a
                            hs[j + 1, k] = a * hs[j, k] + dtu * Bt[bi, t, k]
                    for t in range(t1 - 1, t0 - 1, -1):
                        j = t - t0
                        gyt = gy[bi, di, t]
                        dtt = dt[bi, di, t]
                        ut = u[bi, di, t]
                        dtu = dtt * ut
                        sum_gB = np.float32(0.0)
                        sum_qA = np.float32(0.0)
                        for k in range(n):
                            gk = g[k] + gyt * Ct[bi, t, k]
                            dC_part[gi, bi, t, k] += gyt * hs[j + 1, k]
                            q = gk * hs[j, k] * decay[j, k]
                            sum_qA += q * A[di, k]
                            dA_acc[k] += q * dtt
                            sum_gB += gk * Bt[bi, t, k]
                            dB_part[gi, bi, t, k] += gk * dtu
                            g[k] = gk * decay[j, k]
                        ddt[bi, di, t] = sum_qA + sum_gB * ut
                        du[bi, di, t] = sum_gB * dtt
                for k in range(n):
                    dA_part[bi, di, k] = dA_acc[k]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _forward(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, keep: Tensor, K: int):
    batch, d_inner, L = u.shape
    d_state = A.shape[1]
    Bt = B.transpose(1, 2).contiguous()
    Ct = C.transpose(1, 2).contiguous()
    y = torch.empty(batch, d_inner, L, dtype=torch.float32)
    last = torch.empty(batch, d_inner, d_state, dtype=torch.float32)
    ckpt = torch.empty(batch, d_inner, (L + K - 1) // K, d_state, dtype=torch.float32)
    _forward_kernel(_np(u), _np(dt), _np(A), _np(Bt), _np(Ct), _np(keep), K, y.numpy(), last.numpy(), ckpt.numpy())
    return y, last, ckpt, Bt, Ct


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, keep: Tensor, K: int):
        y, last, ckpt, Bt, Ct = _forward(u, dt, A, B, C, keep, K)
        ctx.save_for_backward(u, dt, A, Bt, Ct, keep, ckpt)
        ctx.K = K
        return y, last

    @staticmethod
    def backward(ctx, gy: Tensor | None, glast: Tensor | None):
        u, dt, A, Bt, Ct, keep, ckpt = ctx.saved_tensors
        batch, d_inner, L = u.shape
        d_state = A.shape[1]
        gy = torch.zeros_like(u) if gy is None else gy.float().contiguous()
        glast = torch.zeros(batch, d_inner, d_state) if glast is None else glast.float().contiguous()
        ng = max(1, min(d_inner, numba.get_num_threads()))
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dA_part = torch.empty(batch, d_inner, d_state, dtype=torch.float64)
        dB_part = torch.zeros(ng, batch, L, d_state, dtype=torch.float32)
        dC_part = torch.zeros(ng, batch, L, d_state, dtype=torch.float32)
        _backward_kernel(
            _np(u), _np(dt), _np(A), _np(Bt), _np(Ct), _np(keep), _np(gy), _np(glast), _np(ckpt), ctx.K, ng,
            du.numpy(), ddt.numpy(), dA_part.numpy(), dB_part.numpy(), dC_part.numpy(),
        )
        dA = dA_part.sum(0).float()
        dB = dB_part.sum(0).transpose(1, 2).contiguous()
        dC = dC_part.sum(0).transpose(1, 2).contiguous()
        return du, ddt, dA, dB, dC, None, None


def scan_core(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, keep: Tensor | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> tuple[Tensor, Tensor]:
    """Fused CPU selective-scan core (same contract as ``torch_scan.scan_core``).

    u, dt: (batch, d_inner, L) float32 CPU; A: (d_inner, d_state) float32;
    B, C: (batch, d_state, L) float32; keep: (batch, L) float32 decay multipliers
    (0 where a packed sequence starts) or None. Returns y (batch, d_inner, L) and
    last_state (batch, d_inner, d_state), both float32; differentiable.
    """
    if not AVAILABLE:
        raise RuntimeError(UNAVAILABLE_REASON)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be ≥ 1 token, got {checkpoint_every}")
    keep = torch.ones(u.shape[0], u.shape[2], dtype=torch.float32) if keep is None else keep.float().contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, dt, A, B, C)):
        return _FusedScan.apply(u, dt, A, B, C, keep, checkpoint_every)
    y, last, _, _, _ = _forward(u, dt, A, B, C, keep, checkpoint_every)
    return y, last
