"""Pure-PyTorch selective-scan core: a chunked, work-efficient parallel scan.

The core computes, for fp32 tensors already past the delta transform,

    h_t = keep_t · exp(dt_t · A) ⊙ h_{t−1} + dt_t · u_t · B_t        h_{−1} = 0
    y_t = ⟨h_t, C_t⟩   (summed over the state dimension)

with ``keep_t`` 1, or 0 where a packed sequence starts (``seq_idx``, see
``trainer.models.ssm.selective.keep_mask``): there the state resets, exactly as
if a separate scan began, and no gradient crosses the boundary.

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

Threads. On CPU every op works on one block — a chunk of tokens times a block
of channels — of fewer than ``SERIAL_ELEMENTS`` elements, torch's intra-op
grain size, so each op runs on the calling thread and none opens an OpenMP
parallel region; the decays use exp2, because torch's float32 exp (MKL vector
math) opens one on every call, whatever the size (``_decay_rates``). A scan is
a long run of small dependent ops (the old 2¹⁸-element chunks made ~300
parallel regions per forward at L = 50,177, d_inner 6, ~2,000 at d_inner 384);
each region ends in a barrier, which costs more than it saves at these sizes
and, when another process holds one of the cores, waits a scheduler time slice
for the descheduled team thread: one forward took 2.6 s with 2 threads instead
of 0.04 s with 1. Blocks this size also stay in L2. Each block shape's scan is
planned once (``_Workspace``: buffers and pre-cut views reused by every chunk
and channel block), so the Python cost per block is a flat list of op calls.
A chunk wider than a block even at ``MIN_CHUNK`` tokens and one channel (batch·
MIN_CHUNK·d_state ≥ 2¹⁵) runs as one-channel blocks whose ops do go parallel.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

SERIAL_ELEMENTS = 1 << 15
"""torch's intra-op grain size (at::internal::GRAIN_SIZE): an elementwise op or reduction
on fewer elements runs on the calling thread, without a parallel region."""
DEFAULT_CHUNK_ELEMENTS = SERIAL_ELEMENTS - 1
"""Target size of one (chunk, batch, d_inner, d_state) work block on CPU, in elements: just under
``SERIAL_ELEMENTS`` (~128 KiB, so a block's handful of buffers also stays in L2). Where even
``MIN_CHUNK`` tokens of all channels are more, the chunk is split into channel blocks."""
CUDA_CHUNK_ELEMENTS = 1 << 22
"""The same on a GPU, where fewer, larger kernels matter more than cache (untuned)."""

_LOG2_E = 1.4426950408889634

MIN_CHUNK = 32
MAX_CHUNK = 2048

Op = tuple[Callable[..., object], tuple[Tensor, ...]]


def chunk_length(batch: int, d_inner: int, d_state: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: a power of two with chunk·batch·d_inner·d_state ≤ chunk_elements, clamped to [MIN_CHUNK, MAX_CHUNK]."""
    per_token = max(1, batch * d_inner * d_state)
    t = max(1, chunk_elements // per_token)
    t = 1 << (t.bit_length() - 1)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, t)))


def channel_blocks(chunk: int, batch: int, d_inner: int, d_state: int, block_elements: int) -> list[tuple[int, int]]:
    """Split d_inner into equal-as-possible [c0, c1) blocks with chunk·batch·(c1 − c0)·d_state ≤ block_elements
    (one channel per block at least)."""
    per_channel = max(1, chunk * batch * d_state)
    size = max(1, min(d_inner, block_elements // per_channel))
    n_blocks = -(-d_inner // size)
    size = -(-d_inner // n_blocks)
    return [(c, min(d_inner, c + size)) for c in range(0, d_inner, size)]


def _run(ops: list[Op]) -> None:
    for op, args in ops:
        op(*args)


def _scan_ops(decay: Tensor, x: Tensor) -> list[Op]:
    """The ops of ``linear_scan(decay, x)`` as a flat list over views of decay, x and fresh scratch buffers.

    Running the list (in order) scans whatever decay and x hold at that time, in place in x;
    the list can be run again after refilling them.
    """
    ops: list[Op] = []

    def plan(decay: Tensor, x: Tensor) -> None:
        T = x.shape[0]
        if T == 1:
            return
        P = T // 2
        # Pair i holds steps (2i, 2i+1); its state h_{2i+1} is scanned in place in x's odd rows.
        h_odd = x[1 : 2 * P : 2]
        ops.append((Tensor.addcmul_, (h_odd, decay[0 : 2 * P : 2], x[0 : 2 * P : 2])))
        if P > 1:
            pair_decay = decay.new_empty((P - 1, *decay.shape[1:]))
            ops.append((partial(torch.mul, out=pair_decay), (decay[2 : 2 * P : 2], decay[1 : 2 * P - 1 : 2])))
            plan(pair_decay, h_odd)
        n_even = (T + 1) // 2 - 1  # even steps 2, 4, ... ≤ T − 1
        if n_even > 0:
            ops.append((Tensor.addcmul_, (x[2::2], decay[1::2][:n_even], h_odd[:n_even])))

    plan(decay, x)
    return ops


def _scan_reverse_ops(decay: Tensor, x: Tensor) -> list[Op]:
    """The ops of ``linear_scan_reverse(decay, x)`` as a flat list, like ``_scan_ops``."""
    ops: list[Op] = []

    def plan(decay: Tensor, x: Tensor) -> None:
        T = x.shape[0]
        if T == 1:
            return
        if T % 2:
            # Fold the unpaired last step into its neighbour; g_{T−1} = x_{T−1} already.
            ops.append((Tensor.addcmul_, (x[T - 2], decay[T - 2], x[T - 1])))
            plan(decay[: T - 2], x[: T - 1])
            return
        P = T // 2
        # Pair i holds steps (2i, 2i+1); its state g_{2i} is scanned in place in x's even rows.
        g_even = x[0::2]
        ops.append((Tensor.addcmul_, (g_even, decay[0::2], x[1::2])))
        if P > 1:
            pair_decay = decay.new_empty((P - 1, *decay.shape[1:]))
            ops.append((partial(torch.mul, out=pair_decay), (decay[0::2][: P - 1], decay[1::2])))
            plan(pair_decay, g_even)
            ops.append((Tensor.addcmul_, (x[1 : T - 1 : 2], decay[1::2], g_even[1:])))

    plan(decay, x)
    return ops


def linear_scan(decay: Tensor, x: Tensor) -> Tensor:
    """Inclusive scan h_0 = x_0, h_k = decay_{k−1} ⊙ h_{k−1} + x_k along dim 0.

    decay: (T − 1, ...) — decay[k − 1] links step k − 1 to step k; x: (T, ...).
    Returns h: (T, ...). Overwrites and returns ``x`` (callers pass a temporary).
    """
    _run(_scan_ops(decay, x))
    return x


def linear_scan_reverse(decay: Tensor, x: Tensor) -> Tensor:
    """Reverse inclusive scan g_{T−1} = x_{T−1}, g_k = decay_k ⊙ g_{k+1} + x_k along dim 0.

    decay: (T − 1, ...) — decay[k] links step k + 1 back to step k; x: (T, ...).
    Returns g: (T, ...). Overwrites and returns ``x``.
    """
    _run(_scan_reverse_ops(decay, x))
    return x


class _Workspace:
    """Buffers and planned scans for one block shape (T, batch, channels, d_state), reused by every
    chunk and channel block of that shape.

    a: decays exp(dt·A); x: inputs dt·u·B, scanned in place into the states h;
    g: adjoint inputs C·gy, reverse-scanned in place into the adjoint states (backward only);
    q, tmp: (T, batch, channels, d_state) scratch (backward only);
    y: (T, batch, channels) scratch.
    """

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device, backward: bool):
        new = partial(torch.empty, dtype=torch.float32, device=device)
        self.a, self.x, self.y = new(shape), new(shape), new(shape[:3])
        self.scan = _scan_ops(self.a[1:], self.x)
        if backward:
            self.g, self.q, self.tmp = new(shape), new(shape), new(shape)
            self.gB, self.ddt, self.du = new(shape[:3]), new(shape[:3]), new(shape[:3])
            self.scan_reverse = _scan_reverse_ops(self.a[1:], self.g)

    def states(self, dt_c: Tensor, du_c: Tensor, rates: Tensor, B_c: Tensor, h_in: Tensor, keep_c: Tensor | None) -> Tensor:
        """Fill a and x for one block and scan: returns the states h (T, batch, channels, d_state) (= self.x).

        dt_c, du_c: (T, batch, channels) dt and dt·u; rates: (channels, d_state) the block's rows of
        ``_decay_rates(A)``; B_c: (T, batch, d_state); h_in: (batch, channels, d_state) the state before the block;
        keep_c: (T, batch) decay multipliers (0 at a packed sequence's first token) or None.
        """
        exp = torch.exp2 if rates.device.type == "cpu" else torch.exp
        exp(torch.mul(dt_c.unsqueeze(-1), rates, out=self.x), out=self.a)
        if keep_c is not None:
            self.a.mul_(keep_c[:, :, None, None])
        torch.mul(du_c.unsqueeze(-1), B_c.unsqueeze(2), out=self.x)
        self.x[0].addcmul_(self.a[0], h_in)
        _run(self.scan)
        return self.x


def _decay_rates(A: Tensor) -> Tensor:
    """A, ready for ``_Workspace.states``: on CPU A·log2(e) in float32 (rounded once from float64),
    the decays then being exp2(dt·A·log2(e)) = exp(dt·A); elsewhere A itself, used with exp.

    On CPU torch's float32 exp goes through MKL's vector math, which opens an OpenMP parallel
    region on every call however small the tensor (see the module docstring); exp2 is a plain
    vectorised kernel. The extra rounding of A·log2(e) is of the size the product dt·A already
    has: a relative error of about |dt·A|·2⁻²⁴ in the decay either way.
    """
    if A.device.type != "cpu":
        return A
    return (A.double() * _LOG2_E).float()


def _time_major(t: Tensor, s: int, e: int) -> Tensor:
    """(batch, k, L) → the contiguous (e − s, batch, k) slice of tokens s..e−1."""
    return t[:, :, s:e].permute(2, 0, 1).contiguous()


def _keep_chunk(keep: Tensor | None, s: int, e: int) -> Tensor | None:
    """(batch, L) decay multipliers → the contiguous (e − s, batch) slice of tokens s..e−1 (None stays None)."""
    return None if keep is None else keep[:, s:e].T.contiguous()


def _workspace(cache: dict, shape: tuple[int, int, int, int], device: torch.device, backward: bool) -> _Workspace:
    if shape not in cache:
        cache[shape] = _Workspace(shape, device, backward)
    return cache[shape]


def _forward_chunks(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, keep: Tensor | None, chunk: int, blocks, keep_boundaries: bool):
    batch, d_inner, L = u.shape
    d_state = A.shape[1]
    y = torch.empty(batch, d_inner, L, dtype=torch.float32, device=u.device)
    h = torch.zeros(batch, d_inner, d_state, dtype=torch.float32, device=u.device)
    n_chunks = (L + chunk - 1) // chunk
    boundaries = torch.empty(n_chunks, batch, d_inner, d_state, dtype=torch.float32, device=u.device) if keep_boundaries else None
    cache: dict = {}
    rates = _decay_rates(A)
    for c in range(n_chunks):
        s, e = c * chunk, min(L, (c + 1) * chunk)
        if boundaries is not None:
            boundaries[c] = h
        dt_c = _time_major(dt, s, e)
        du_c = dt_c * _time_major(u, s, e)
        B_c, C_c = _time_major(B, s, e), _time_major(C, s, e).unsqueeze(2)
        keep_c = _keep_chunk(keep, s, e)
        for c0, c1 in blocks:
            ws = _workspace(cache, (e - s, batch, c1 - c0, d_state), u.device, backward=False)
            h_blk = h[:, c0:c1]
            hs = ws.states(dt_c[:, :, c0:c1], du_c[:, :, c0:c1], rates[c0:c1], B_c, h_blk, keep_c)
            h_blk.copy_(hs[-1])
            torch.sum(hs.mul_(C_c), -1, out=ws.y)
            y[:, c0:c1, s:e] = ws.y.permute(1, 2, 0)
    return y, h, boundaries


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, keep: Tensor | None, chunk: int, blocks):
        y, last, boundaries = _forward_chunks(u, dt, A, B, C, keep, chunk, blocks, keep_boundaries=True)
        ctx.save_for_backward(u, dt, A, B, C, boundaries, keep)
        ctx.chunk, ctx.blocks = chunk, blocks
        return y, last

    @staticmethod
    def backward(ctx, gy: Tensor | None, glast: Tensor | None):
        u, dt, A, B, C, boundaries, keep = ctx.saved_tensors
        chunk, blocks = ctx.chunk, ctx.blocks
        batch, d_inner, L = u.shape
        d_state = A.shape[1]
        gy = torch.zeros_like(u) if gy is None else gy.float()
        lam = torch.zeros_like(boundaries[0]) if glast is None else glast.float().clone()
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        cache: dict = {}
        rates = _decay_rates(A)
        for c in range(boundaries.shape[0] - 1, -1, -1):
            s, e = c * chunk, min(L, (c + 1) * chunk)
            dt_c, u_c, gy_c = _time_major(dt, s, e), _time_major(u, s, e), _time_major(gy, s, e)
            du_c = dt_c * u_c
            B_c, C_c = _time_major(B, s, e), _time_major(C, s, e)
            dB_c, dC_c = torch.zeros_like(B_c), torch.zeros_like(C_c)  # (T, batch, d_state), summed over blocks
            keep_c = _keep_chunk(keep, s, e)
            for c0, c1 in blocks:
                ws = _workspace(cache, (e - s, batch, c1 - c0, d_state), u.device, backward=True)
                h_in, lam_blk, A_blk = boundaries[c, :, c0:c1], lam[:, c0:c1], A[c0:c1]
                dt_b, du_b, gy_b = dt_c[:, :, c0:c1].unsqueeze(-1), du_c[:, :, c0:c1].unsqueeze(-1), gy_c[:, :, c0:c1].unsqueeze(-1)
                a, hs, g, q, tmp = ws.a, ws.x, ws.g, ws.q, ws.tmp
                # Zero decays at sequence starts cut the adjoint (reverse scan, q, lam) there too.
                ws.states(dt_c[:, :, c0:c1], du_c[:, :, c0:c1], rates[c0:c1], B_c, h_in, keep_c)
                dC_c.add_(torch.mul(hs, gy_b, out=tmp).sum(2))
                # Adjoint g_t = dL/dh_t = C_t·gy_t + a_{t+1} ⊙ g_{t+1}, a reverse scan.
                torch.mul(gy_b, C_c.unsqueeze(2), out=g)
                g[-1].add_(lam_blk)
                _run(ws.scan_reverse)
                # q_t = g_t ⊙ h_{t−1} ⊙ a_t: the gradient reaching dt and A through the decay.
                torch.mul(hs[:-1], a[1:], out=q[1:])
                torch.mul(h_in, a[0], out=q[0])
                q.mul_(g)
                torch.mul(g[0], a[0], out=lam_blk)
                dA[c0:c1] += torch.mul(q, dt_b, out=tmp).sum((0, 1))
                dB_c.add_(torch.mul(g, du_b, out=tmp).sum(2))
                torch.sum(torch.mul(g, B_c.unsqueeze(2), out=tmp), -1, out=ws.gB)
                torch.sum(q.mul_(A_blk), -1, out=ws.ddt).addcmul_(ws.gB, u_c[:, :, c0:c1])
                ddt[:, c0:c1, s:e] = ws.ddt.permute(1, 2, 0)
                du[:, c0:c1, s:e] = torch.mul(ws.gB, dt_c[:, :, c0:c1], out=ws.du).permute(1, 2, 0)
            dB[:, :, s:e] = dB_c.permute(1, 2, 0)
            dC[:, :, s:e] = dC_c.permute(1, 2, 0)
        return du, ddt, dA, dB, dC, None, None, None


def scan_core(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, keep: Tensor | None = None, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """Chunked selective-scan core.

    u, dt: (batch, d_inner, L) float32 (dt already softplus-ed / biased);
    A: (d_inner, d_state) float32; B, C: (batch, d_state, L) float32;
    keep: (batch, L) float32 decay multipliers — 0 where a packed sequence starts, 1 elsewhere
      (``selective.keep_mask(seq_idx)``) — or None (one sequence per batch row);
    chunk: tokens per chunk (default: ``chunk_length`` of the shapes and device).
    Returns y: (batch, d_inner, L) float32 and last_state: (batch, d_inner, d_state) float32.
    Differentiable in u, dt, A, B, C and through last_state.
    """
    batch, d_inner, L = u.shape
    d_state = A.shape[1]
    elements = CUDA_CHUNK_ELEMENTS if u.is_cuda else DEFAULT_CHUNK_ELEMENTS
    if chunk is None:
        chunk = chunk_length(batch, d_inner, d_state, elements)
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1 token, got {chunk}")
    blocks = channel_blocks(min(chunk, L), batch, d_inner, d_state, elements)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, dt, A, B, C)):
        return _ChunkedScan.apply(u, dt, A, B, C, keep, chunk, blocks)
    y, last, _ = _forward_chunks(u, dt, A, B, C, keep, chunk, blocks, keep_boundaries=False)
    return y, last
