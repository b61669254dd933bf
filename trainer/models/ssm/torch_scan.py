"""Pure-PyTorch selective-scan core: a chunked, work-efficient parallel scan.

The core computes, for fp32 tensors already past the delta transform,

    h_t = exp(dt_t · A) ⊙ h_{t−1} + dt_t · u_t · B_t        h_{−1} = 0
    y_t = ⟨h_t, C_t⟩   (summed over the state dimension)

The sequence is cut into chunks. Inside a chunk the recurrence is an inclusive
scan over (decay, input) pairs, done by odd–even reduction (Blelloch's
work-efficient scheme: about twice the work of a sequential loop, log2(T)
levels). Pairs are combined only by multiplying decays — in (0, 1] for dt ≥ 0
and A ≤ 0, as in Mamba — and adding, so nothing can overflow however large
|Σ dt·A| grows — unlike the
"exp(−cumsum(dt·A))" factorisation. Chunks run one after another with the
state carried between them, so no (L, d_inner, d_state) tensor ever exists.

Backward recomputes each chunk's states from the chunk-boundary states saved
by forward, walking the chunks in reverse and carrying the adjoint state
(a reverse scan of the same kind). Saved for backward: the inputs and one
(batch, d_inner, d_state) state per chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 18
"""Target size of one (chunk, batch, d_inner, d_state) work tensor, in elements: ~1 MiB,
so a chunk's handful of work tensors stays in a CPU core's L2 cache (tuned on 2 cores)."""
CUDA_CHUNK_ELEMENTS = 1 << 22
"""The same on a GPU, where fewer, larger kernels matter more than cache (untuned)."""

MIN_CHUNK = 16
MAX_CHUNK = 2048


def chunk_length(batch: int, d_inner: int, d_state: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: a power of two with chunk·batch·d_inner·d_state ≈ chunk_elements."""
    per_token = max(1, batch * d_inner * d_state)
    t = max(1, chunk_elements // per_token)
    t = 1 << (t.bit_length() - 1)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, t)))


def linear_scan(decay: Tensor, x: Tensor) -> Tensor:
    """Inclusive scan h_0 = x_0, h_k = decay_{k−1} ⊙ h_{k−1} + x_k along dim 0.

    decay: (T − 1, ...) — decay[k − 1] links step k − 1 to step k; x: (T, ...).
    Returns h: (T, ...). Overwrites and returns ``x`` (callers pass a temporary).
    """
    T = x.shape[0]
    if T == 1:
        return x
    P = T // 2
    # Pair i holds steps (2i, 2i+1); its state h_{2i+1} is scanned in place in x's odd rows.
    h_odd = x[1 : 2 * P : 2]
    h_odd.addcmul_(decay[0 : 2 * P : 2], x[0 : 2 * P : 2])
    linear_scan(decay[2 : 2 * P : 2] * decay[1 : 2 * P - 1 : 2], h_odd)
    n_even = (T + 1) // 2 - 1  # even steps 2, 4, ... ≤ T − 1
    if n_even > 0:
        x[2::2].addcmul_(decay[1::2][:n_even], h_odd[:n_even])
    return x


def linear_scan_reverse(decay: Tensor, x: Tensor) -> Tensor:
    """Reverse inclusive scan g_{T−1} = x_{T−1}, g_k = decay_k ⊙ g_{k+1} + x_k along dim 0.

    decay: (T − 1, ...) — decay[k] links step k + 1 back to step k; x: (T, ...).
    Returns g: (T, ...). Overwrites and returns ``x``.
    """
    T = x.shape[0]
    if T == 1:
        return x
    if T % 2:
        # Fold the unpaired last step into its neighbour; g_{T−1} = x_{T−1} already.
        x[T - 2].addcmul_(decay[T - 2], x[T - 1])
        linear_scan_reverse(decay[: T - 2], x[: T - 1])
        return x
    P = T // 2
    # Pair i holds steps (2i, 2i+1); its state g_{2i} is scanned in place in x's even rows.
    g_even = x[0::2]
    g_even.addcmul_(decay[0::2], x[1::2])
    linear_scan_reverse(decay[0::2][: P - 1] * decay[1::2], g_even)
    x[1 : T - 1 : 2].addcmul_(decay[1::2], g_even[1:])
    return x


def _chunk_inputs(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, s: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
    """Time-major chunk tensors: dt (T, b, d), decay a = exp(dt·A) (T, b, d, n), input dt·u·B (T, b, d, n)."""
    dt_c = dt[:, :, s:e].permute(2, 0, 1)
    a = torch.exp(dt_c.unsqueeze(-1) * A)
    x = (dt_c * u[:, :, s:e].permute(2, 0, 1)).unsqueeze(-1) * B[:, :, s:e].permute(2, 0, 1).unsqueeze(2)
    return dt_c, a, x


def _forward_chunks(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int, keep_boundaries: bool):
    batch, d_inner, L = u.shape
    d_state = A.shape[1]
    y = torch.empty(batch, d_inner, L, dtype=torch.float32, device=u.device)
    h = torch.zeros(batch, d_inner, d_state, dtype=torch.float32, device=u.device)
    n_chunks = (L + chunk - 1) // chunk
    boundaries = torch.empty(n_chunks, batch, d_inner, d_state, dtype=torch.float32, device=u.device) if keep_boundaries else None
    for c in range(n_chunks):
        s, e = c * chunk, min(L, (c + 1) * chunk)
        if boundaries is not None:
            boundaries[c] = h
        _, a, x = _chunk_inputs(u, dt, A, B, s, e)
        x[0].addcmul_(a[0], h)
        hs = linear_scan(a[1:], x)
        h = hs[-1].clone()
        y[:, :, s:e] = torch.matmul(hs, C[:, :, s:e].permute(2, 0, 1).unsqueeze(-1)).squeeze(-1).permute(1, 2, 0)
    return y, h, boundaries


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int):
        y, last, boundaries = _forward_chunks(u, dt, A, B, C, chunk, keep_boundaries=True)
        ctx.save_for_backward(u, dt, A, B, C, boundaries)
        ctx.chunk = chunk
        return y, last

    @staticmethod
    def backward(ctx, gy: Tensor | None, glast: Tensor | None):
        u, dt, A, B, C, boundaries = ctx.saved_tensors
        chunk = ctx.chunk
        batch, d_inner, L = u.shape
        gy = torch.zeros_like(u) if gy is None else gy.float()
        lam = torch.zeros_like(boundaries[0]) if glast is None else glast.float().clone()
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        for c in range(boundaries.shape[0] - 1, -1, -1):
            s, e = c * chunk, min(L, (c + 1) * chunk)
            h_in = boundaries[c]
            dt_c, a, x = _chunk_inputs(u, dt, A, B, s, e)
            x[0].addcmul_(a[0], h_in)
            hs = linear_scan(a[1:], x)
            C_c = C[:, :, s:e].permute(2, 0, 1)
            gy_c = gy[:, :, s:e].permute(2, 0, 1)
            dC[:, :, s:e] = torch.matmul(gy_c.unsqueeze(-2), hs).squeeze(-2).permute(1, 2, 0)
            # Adjoint g_t = dL/dh_t = C_t·gy_t + a_{t+1} ⊙ g_{t+1}, a reverse scan.
            cg = gy_c.unsqueeze(-1) * C_c.unsqueeze(2)
            cg[-1] += lam
            g = linear_scan_reverse(a[1:], cg)
            # q_t = g_t ⊙ h_{t−1} ⊙ a_t: the gradient reaching dt and A through the decay.
            q = torch.empty_like(hs)
            torch.mul(hs[:-1], a[1:], out=q[1:])
            torch.mul(h_in, a[0], out=q[0])
            q.mul_(g)
            lam = g[0] * a[0]
            del hs, cg, x, a
            dA += (q * dt_c.unsqueeze(-1)).sum((0, 1))
            u_c = u[:, :, s:e].permute(2, 0, 1)
            gB = torch.matmul(g, B[:, :, s:e].permute(2, 0, 1).unsqueeze(-1)).squeeze(-1)
            ddt[:, :, s:e] = (q.mul_(A).sum(-1) + gB * u_c).permute(1, 2, 0)
            du[:, :, s:e] = (gB * dt_c).permute(1, 2, 0)
            dB[:, :, s:e] = torch.matmul((dt_c * u_c).unsqueeze(-2), g).squeeze(-2).permute(1, 2, 0)
        return du, ddt, dA, dB, dC, None


def scan_core(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Chunked selective-scan core.

    u, dt: (batch, d_inner, L) float32 (dt already softplus-ed / biased);
    A: (d_inner, d_state) float32; B, C: (batch, d_state, L) float32;
    chunk: tokens per chunk (default: ``chunk_length`` of the shapes and device).
    Returns y: (batch, d_inner, L) float32 and last_state: (batch, d_inner, d_state) float32.
    Differentiable in u, dt, A, B, C and through last_state.
    """
    batch, d_inner, L = u.shape
    if chunk is None:
        elements = CUDA_CHUNK_ELEMENTS if u.is_cuda else DEFAULT_CHUNK_ELEMENTS
        chunk = chunk_length(batch, d_inner, A.shape[1], elements)
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1 token, got {chunk}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, dt, A, B, C)):
        return _ChunkedScan.apply(u, dt, A, B, C, chunk)
    y, last, _ = _forward_chunks(u, dt, A, B, C, chunk, keep_boundaries=False)
    return y, last
