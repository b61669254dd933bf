"""Depthwise causal conv1d (Mamba's short convolution), with an optional fused CUDA path.

On CUDA tensors, ``causal_conv1d_fn`` from the ``causal-conv1d`` package is used
when it imports (tried once, here); everywhere else ``F.conv1d`` with width − 1
zeros of left padding, which computes the same function.

Packing: with ``seq_idx: (batch, L)`` a new sequence starts wherever seq_idx
changes from one token to the next (as in the scan), and no tap reaches back
across a start, so every packed sequence is convolved as if it stood alone with
zeros before its first token. For sequences that are contiguous runs of
distinct ids this is causal-conv1d's rule (tap t − s used iff its seq_idx equals t's).
The fused kernel takes ``seq_idx`` only in channel-last layout, so x is handed
to it that way; the unfused path spaces the sequences apart with width − 1
zeros and runs ``F.conv1d`` once per batch row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from causal_conv1d import causal_conv1d_fn as _fused_causal_conv1d
except Exception as exc:  # any failure (no build, no CUDA) means: no fused conv
    _fused_causal_conv1d = None
    FUSED_UNAVAILABLE_REASON = f"causal-conv1d could not be imported ({type(exc).__name__}: {exc})"
else:
    FUSED_UNAVAILABLE_REASON = ""

ACTIVATIONS = (None, "silu", "swish")
CONV_BACKENDS = ("auto", "torch", "numba", "cuda")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    *,
    seq_idx: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """y[b, c, t] = act(bias[c] + Σ_k weight[c, k] · x[b, c, t − (width − 1) + k]), zeros before t = 0.

    x: (batch, d, L); weight: (d, width); bias: (d,) or None;
    seq_idx: (batch, L) integer or None — terms reaching back across a change of seq_idx are dropped;
    activation: None, "silu" or "swish" (the same). backend: "cuda" forces the
    fused kernel (error when it is unavailable or x is not on CUDA); "auto" uses
    it on CUDA when present; "torch" and "numba" use ``F.conv1d`` (numba has no
    conv kernel — the convolution is cheap). Returns (batch, d, L), x's dtype.
    """
    if backend not in CONV_BACKENDS:
        raise ValueError(f"unknown causal_conv1d backend {backend!r}; choose one of {CONV_BACKENDS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, d, L), got shape {tuple(x.shape)}")
    d = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be (d={d}, width), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"bias must be (d={d},), got shape {tuple(bias.shape)}")
    if seq_idx is not None:
        if not isinstance(seq_idx, Tensor) or seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
            raise ValueError("seq_idx must be a (batch, L) integer tensor or None")
        if tuple(seq_idx.shape) != (x.shape[0], x.shape[2]):
            raise ValueError(f"seq_idx must be (batch={x.shape[0]}, L={x.shape[2]}), got shape {tuple(seq_idx.shape)}")
        if seq_idx.device != x.device:
            raise ValueError(f"seq_idx is on {seq_idx.device} but x is on {x.device}")
    use_fused = backend == "cuda" or (backend == "auto" and x.is_cuda and _fused_causal_conv1d is not None)
    if use_fused:
        if _fused_causal_conv1d is None:
            raise RuntimeError(f"causal_conv1d backend 'cuda' unavailable: {FUSED_UNAVAILABLE_REASON}")
        if not x.is_cuda:
            raise RuntimeError(f"causal_conv1d backend 'cuda' needs CUDA tensors, got device {x.device}")
        if seq_idx is None:
            return _fused_causal_conv1d(x, weight, bias, activation=activation)
        channel_last = x.transpose(1, 2).contiguous().transpose(1, 2)
        return _fused_causal_conv1d(channel_last, weight, bias, seq_idx=seq_idx.to(torch.int32), activation=activation)
    width = weight.shape[1]
    if seq_idx is None:
        y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=d)
    else:
        y = _masked_conv(x, weight, bias, seq_idx)
    return F.silu(y) if activation is not None else y


def _masked_conv(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor) -> Tensor:
    """The unfused conv with no tap across a change of seq_idx: x (batch, d, L) → (batch, d, L).

    Each row's tokens are copied apart so that width − 1 zeros precede every sequence start,
    convolved with ``F.conv1d`` and gathered back — every sequence sees exactly the zeros a
    separate call would pad it with (taps never reach the sequence before the zeros).
    """
    batch, d, L = x.shape
    width = weight.shape[1]
    starts = torch.zeros(seq_idx.shape, dtype=torch.long, device=x.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    pos = torch.arange(L, device=x.device) + torch.cumsum(starts, dim=1) * (width - 1)  # (batch, L) spread-out positions
    spread = int(pos[:, -1].max()) + 1
    rows = []
    for b in range(batch):
        spaced = x.new_zeros(d, spread).index_copy(1, pos[b], x[b])
        y = F.conv1d(F.pad(spaced, (width - 1, 0)).unsqueeze(0), weight.unsqueeze(1), bias, groups=d)
        rows.append(y[0].index_select(1, pos[b]))
    return torch.stack(rows)
