"""Selective-scan backends for Pixel-Mamba, behind one mamba-ssm-compatible function.

    y = selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False, *, seq_idx=None, backend="auto")

``seq_idx`` (batch, L) packs several sequences into one batch row: the state resets
wherever it changes along L (``selective.py``). Every backend but ``cuda`` implements it;
``supports_seq_idx`` says which, so callers can fall back to separate calls.

Backends (``BACKENDS``):
  - ``torch``: pure PyTorch, chunked parallel scan with recompute-in-backward (any device);
  - ``numba``: fused native CPU loop, forward and backward (CPU tensors, needs numba);
  - ``cuda``:  mamba-ssm's fused kernel (CUDA tensors, needs the mamba-ssm build);
  - ``triton``: fused Triton kernels, with ``seq_idx`` packing (CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1; needs triton);
  - ``auto``:  on GPU cuda when mamba-ssm imports and no packing is asked for, else
    triton when it imports; on CPU numba when it imports and passes a small self-check
    against ``torch``; else torch.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from trainer.models.ssm import cuda_scan, numba_scan, torch_scan, triton_scan
from trainer.models.ssm.conv import causal_conv1d
from trainer.models.ssm.selective import selective_scan

BACKENDS = ("auto", "torch", "numba", "cuda", "triton")

__all__ = [
    "BACKENDS", "BackendUnavailableError", "causal_conv1d", "resolve_backend", "selective_scan_fn", "supports_seq_idx",
]


class BackendUnavailableError(RuntimeError):
    """A selective-scan backend was requested that cannot run here (missing package or wrong device)."""


@lru_cache(maxsize=1)
def _numba_self_check() -> str:
    """'' when the numba core matches the torch core on a small random problem, else why not."""
    if not numba_scan.AVAILABLE:
        return numba_scan.UNAVAILABLE_REASON
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 1, 3, 4, 37
    u = torch.randn(b, d, L, generator=g)
    dt = torch.rand(b, d, L, generator=g) * 0.5
    A = -torch.rand(d, n, generator=g) * 2 - 0.1
    B = torch.randn(b, n, L, generator=g)
    C = torch.randn(b, n, L, generator=g)
    try:
        with torch.no_grad():
            y_n, h_n = numba_scan.scan_core(u, dt, A, B, C, checkpoint_every=8)
            y_t, h_t = torch_scan.scan_core(u, dt, A, B, C)
    except Exception as exc:
        return f"numba kernel failed its self-check ({type(exc).__name__}: {exc})"
    if not (torch.allclose(y_n, y_t, rtol=1e-4, atol=1e-5) and torch.allclose(h_n, h_t, rtol=1e-4, atol=1e-5)):
        return "numba kernel disagrees with the torch scan on its self-check"
    return ""


def resolve_backend(backend: str = "auto", device: torch.device | str | None = None, *, packed: bool = False) -> str:
    """The concrete backend ("torch", "numba", "cuda" or "triton") that ``backend`` means for tensors on
    ``device``; ``packed``: the call passes ``seq_idx`` (mamba-ssm cannot reset its state inside a row).

    Raises ValueError for an unknown name and BackendUnavailableError when a
    forced backend cannot run here (the message says why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {BACKENDS}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "auto":
        if dev.type == "cuda" and cuda_scan.AVAILABLE and not packed:
            return "cuda"
        if dev.type == "cuda" and triton_scan.AVAILABLE:
            return "triton"
        if dev.type == "cpu" and _numba_self_check() == "":
            return "numba"
        return "torch"
    if backend == "cuda":
        if not cuda_scan.AVAILABLE:
            raise BackendUnavailableError(
                f"selective-scan backend 'cuda' is unavailable: {cuda_scan.UNAVAILABLE_REASON}. "
                "Install the CUDA extra (pip install '.[cuda]') on a machine with a CUDA toolchain, "
                "or use backend='torch'."
            )
        if dev.type != "cuda":
            raise BackendUnavailableError(f"selective-scan backend 'cuda' needs CUDA tensors, got device {dev}")
    if backend == "triton" and triton_scan.unavailable_reason(dev):
        raise BackendUnavailableError(
            f"selective-scan backend 'triton' is unavailable: {triton_scan.unavailable_reason(dev)}"
            + (" (pip install triton, on Linux x86_64)" if not triton_scan.AVAILABLE else "")
        )
    if backend == "numba":
        if not numba_scan.AVAILABLE:
            raise BackendUnavailableError(f"selective-scan backend 'numba' is unavailable: {numba_scan.UNAVAILABLE_REASON}")
        if dev.type != "cpu":
            raise BackendUnavailableError(f"selective-scan backend 'numba' runs on CPU tensors only, got device {dev}")
    return backend


NO_SEQ_IDX_BACKENDS = frozenset({"cuda"})
"""Concrete backends whose kernel cannot reset its state inside a sequence (mamba-ssm's)."""


def supports_seq_idx(backend: str = "auto", device: torch.device | str | None = None) -> bool:
    """Whether ``selective_scan_fn(..., seq_idx=..., backend=backend)`` runs for tensors on ``device``."""
    return resolve_backend(backend, device, packed=True) not in NO_SEQ_IDX_BACKENDS


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    seq_idx: Tensor | None = None,
    backend: str = "auto",
):
    """Selective scan with mamba-ssm's signature and semantics.

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state) float32, negative;
    B, C: (batch, d_state, L); D, delta_bias: (d_inner,) float32.
    delta ← softplus(delta + delta_bias) (bias added whenever given, softplus only
    when ``delta_softplus``); h_t = exp(delta_t·A) ⊙ h_{t−1} + delta_t·B_t·u_t;
    y_t = ⟨h_t, C_t⟩ + D·u_t; y ← y·silu(z). Computed in float32.
    seq_idx: (batch, L) integer (int32, as causal-conv1d takes it) or None: the state resets
    (decay 0) at every token whose seq_idx differs from the previous token's, so packed
    sequences are scanned as if separately; last_state is then the last sequence's.
    Returns y (batch, d_inner, L) in u's dtype, or (y, last_state) with
    last_state (batch, d_inner, d_state) float32 when ``return_last_state``.
    Raises BackendUnavailableError when seq_idx is given to a backend without packing (``cuda``).
    """
    name = resolve_backend(backend, u.device, packed=seq_idx is not None)
    if seq_idx is not None and name in NO_SEQ_IDX_BACKENDS:
        raise BackendUnavailableError(
            f"selective-scan backend {name!r} (mamba-ssm) cannot reset its state inside a sequence, so it "
            "does not take seq_idx; run the packed sequences as separate calls (or batch equal lengths), "
            "or choose a backend that packs (supports_seq_idx)."
        )
    if name == "triton":
        return triton_scan.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, seq_idx=seq_idx
        )
    if name == "cuda":
        return cuda_scan.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    core = numba_scan.scan_core if name == "numba" else torch_scan.scan_core
    return selective_scan(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, seq_idx=seq_idx)
