"""The ``triton`` selective-scan backend: fused Triton kernels with mamba-ssm's semantics, plus packing.

    y, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, seq_idx=seq_idx)

Everything of ``selective_scan_fn`` happens inside the two kernels of ``triton_kernels``:
delta + delta_bias, softplus, the recurrence in float32, ⟨h_t, C_t⟩, the D skip and the
silu(z) gate, for float32, bfloat16 or float16 inputs (other floating dtypes are cast to
float32 first). ``seq_idx`` (batch, L) int32 packs several sequences into one row: wherever
``seq_idx[b, t] != seq_idx[b, t − 1]`` the state restarts from zero (the decay at t is
taken as 0, with no gradient), so the row scans exactly like separate calls per segment.

Memory. Forward keeps one float32 (d_state,) state per (row, channel, chunk of
``chunk`` tokens): batch·d_inner·⌈L/chunk⌉·d_state floats; backward recomputes each
chunk's states from it. dB and dC are accumulated over channels in float32 buffers of
B's and C's shape, by atomic adds (so on a GPU they are not bitwise reproducible run to run).

Devices. CUDA tensors run compiled kernels. CPU tensors run under Triton's interpreter
(slow: meant for tests), only when ``TRITON_INTERPRET=1`` was set before triton was first
imported — ``triton.jit`` and Triton's own library functions pick interpreted or compiled
code when they are decorated, at import.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from trainer.models.ssm.selective import check_shapes

try:
    import triton

    from trainer.models.ssm import triton_kernels
except Exception as exc:  # ImportError, or a broken install (missing libraries, ...)
    triton = triton_kernels = None
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton could not be imported ({type(exc).__name__}: {exc})"
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

INTERPRETED = AVAILABLE and type(triton_kernels.scan_fwd_kernel).__name__ == "InterpretedFunction"
"""Whether the kernels were decorated under TRITON_INTERPRET=1 (then they run on CPU tensors too)."""

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_CHUNK = 64
"""Tokens per chunk on a GPU: a (64, d_state) tile per program, 8 warps (untimed; compiled for sm_90 at
d_state 16 the kernels take 76–78 (forward) and 128–177 (backward) registers without spills; at 128
tokens backward reaches the 255-register cap)."""
INTERPRETER_CHUNK = 16
"""Tokens per chunk under the interpreter, which runs a scan one element at a time in Python."""



def unavailable_reason(device: torch.device | str) -> str:
    """'' when this backend can run on tensors on ``device``, else why not (for the error message)."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    dev = torch.device(device)
    if dev.type == "cuda" or (dev.type == "cpu" and INTERPRETED):
        return ""
    if dev.type == "cpu":
        late = " (it is set now, but triton was imported before)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        return ("it runs CPU tensors only under Triton's interpreter: set TRITON_INTERPRET=1 before triton is "
                f"first imported{late} (slow; for tests)")
    return f"it needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got device {dev}"


def _kernel_dtype(t: Tensor | None) -> Tensor | None:
    """t, contiguous, in a dtype the kernels load (float64 and others → float32)."""
    if t is None:
        return None
    if t.dtype not in KERNEL_DTYPES:
        t = t.float()
    return t.contiguous()


def check_seq_idx(seq_idx: Tensor | None, u: Tensor) -> Tensor | None:
    """seq_idx as a contiguous int32 (batch, L) tensor on u's device; ValueError naming what is wrong."""
    if seq_idx is None:
        return None
    batch, _, L = u.shape
    if tuple(seq_idx.shape) != (batch, L):
        raise ValueError(f"seq_idx must be (batch={batch}, L={L}), got shape {tuple(seq_idx.shape)}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise ValueError(f"seq_idx must be an integer tensor (int32), got {seq_idx.dtype}")
    if seq_idx.device != u.device:
        raise ValueError(f"seq_idx must be on u's device {u.device}, got {seq_idx.device}")
    if seq_idx.dtype != torch.int32:
        if seq_idx.numel() and (seq_idx.min() < torch.iinfo(torch.int32).min or seq_idx.max() > torch.iinfo(torch.int32).max):
            raise ValueError("seq_idx values do not fit in int32")
        seq_idx = seq_idx.to(torch.int32)
    return seq_idx.contiguous()


def _chunk(L: int, device: torch.device, chunk: int | None) -> int:
    if chunk is None:
        chunk = CUDA_CHUNK if device.type == "cuda" else INTERPRETER_CHUNK
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two ≥ 2 tokens, got {chunk}")
    return min(chunk, max(2, 1 << (L - 1).bit_length()))  # no wider than L rounded up to a power of two


def launch_options(chunk: int, device: torch.device) -> dict:
    """Compile options of both kernels for a chunk length (the interpreter takes none). FMA contraction
    is asked for explicitly: Triton's default for it changes in 3.10."""
    return {"num_warps": 8 if chunk >= 64 else 4, "enable_fp_fusion": True} if device.type == "cuda" else {}


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus: bool, chunk: int):
        batch, d_inner, L = u.shape
        d_state = A.shape[1]
        n_chunks = -(-L // chunk)
        save = any(ctx.needs_input_grad[:8])
        out = torch.empty_like(u)
        last = torch.empty(batch, d_inner, d_state, dtype=torch.float32, device=u.device)
        states = torch.empty(batch, d_inner, n_chunks, d_state, dtype=torch.float32, device=u.device) if save else last
        triton_kernels.scan_fwd_kernel[(batch, d_inner)](
            u, delta, A, B, C, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias, u if seq_idx is None else seq_idx,
            out, last, states,
            L, d_inner, d_state, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_SEQ=seq_idx is not None, SOFTPLUS=delta_softplus, SAVE_STATES=save,
            BLOCK_T=chunk, BLOCK_N=max(2, triton.next_power_of_2(d_state)),
            **launch_options(chunk, u.device),
        )
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, states)
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        return out, last

    @staticmethod
    def backward(ctx, gout: Tensor | None, glast: Tensor | None):
        u, delta, A, B, C, D, z, delta_bias, seq_idx, states = ctx.saved_tensors
        batch, d_inner, L = u.shape
        d_state = A.shape[1]
        n_chunks = states.shape[2]
        f32 = dict(dtype=torch.float32, device=u.device)
        gout = torch.zeros_like(u) if gout is None else gout.to(u.dtype).contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        dA = torch.empty(batch, d_inner, d_state, **f32)
        dD = torch.empty(batch, d_inner, **f32) if D is not None else None
        dbias = torch.empty(batch, d_inner, **f32) if delta_bias is not None else None
        triton_kernels.scan_bwd_kernel[(batch, d_inner)](
            u, delta, A, B, C, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias, u if seq_idx is None else seq_idx, states,
            gout, states if glast is None else glast.float().contiguous(),
            du, ddelta, u if dz is None else dz, dA, dB, dC, dA if dD is None else dD, dA if dbias is None else dbias,
            L, d_inner, d_state, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_SEQ=seq_idx is not None, SOFTPLUS=ctx.delta_softplus, HAS_GLAST=glast is not None,
            BLOCK_T=ctx.chunk, BLOCK_N=max(2, triton.next_power_of_2(d_state)),
            **launch_options(ctx.chunk, u.device),
        )
        return (
            du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if dD is None else dD.sum(0).to(D.dtype), dz,
            None if dbias is None else dbias.sum(0).to(delta_bias.dtype),
            None, None, None,
        )


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
    delta_softplus: bool = False, return_last_state: bool = False,
    *, seq_idx: Tensor | None = None, chunk: int | None = None,
):
    """Selective scan with mamba-ssm semantics on the Triton kernels.

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D, delta_bias: (d_inner,); seq_idx: (batch, L) integer, or None for one sequence per row;
    chunk: tokens per chunk, a power of two (default ``CUDA_CHUNK`` on GPU, ``INTERPRETER_CHUNK`` on CPU).
    Returns y (batch, d_inner, L) in u's dtype, or (y, last_state) with last_state
    (batch, d_inner, d_state) float32, the state after token L − 1 (of the last segment when packed).
    Differentiable in every floating input.
    """
    check_shapes(u, delta, A, B, C, D, z, delta_bias)
    seq = check_seq_idx(seq_idx, u)
    size = _chunk(u.shape[-1], u.device, chunk)
    reason = unavailable_reason(u.device)
    if reason:
        raise RuntimeError(f"the triton selective scan cannot run: {reason}")
    if u.shape[0] == 0 or u.shape[1] == 0:  # nothing to scan: no kernel launch on an empty grid
        from trainer.models.ssm import torch_scan
        from trainer.models.ssm.selective import selective_scan as scan_with

        return scan_with(torch_scan.scan_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    args = [_kernel_dtype(t) for t in (u, delta, A, B, C, D, z, delta_bias)]
    y, last = _TritonScan.apply(*args, seq, bool(delta_softplus), size)
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y
