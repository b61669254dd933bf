"""Depthwise causal conv1d (Mamba's short convolution), with an optional fused CUDA path.

On CUDA tensors, ``causal_conv1d_fn`` from the ``causal-conv1d`` package is used
when it imports (tried once, here); everywhere else ``F.conv1d`` with width − 1
zeros of left padding, which computes the same function.

Packing: with ``seq_idx: (batch, L)`` a tap reads token t − s only when
``seq_idx[t − s] == seq_idx[t]`` (causal-conv1d's rule), so every packed
sequence is convolved as if it stood alone with zeros before its first token.
The fused kernel takes ``seq_idx`` only in channel-last layout, so x is handed
to it that way; the unfused path sums the width shifted, masked copies of x.
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
    seq_idx: (batch, L) integer or None — terms whose token has another seq_idx than t's are dropped;
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
    """The unfused conv with taps across seq_idx boundaries dropped: Σ over shifts s = 0..width − 1 of
    weight[:, width − 1 − s] · x[t − s] · [seq_idx[t − s] == seq_idx[t]]. x (batch, d, L) → (batch, d, L)."""
    width, L = weight.shape[1], x.shape[2]
    y = x * weight[:, width - 1, None]
    if bias is not None:
        y = y + bias[:, None]
    for s in range(1, min(width, L)):
        same = (seq_idx[:, s:] == seq_idx[:, :-s]).to(x.dtype)  # (batch, L − s): token t − s is in t's sequence
        tap = x[:, :, :-s] * (weight[:, width - 1 - s, None] * same[:, None, :])
        y = y + F.pad(tap, (s, 0))
    return y
