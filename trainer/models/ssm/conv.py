"""Depthwise causal conv1d (Mamba's short convolution), with an optional fused CUDA path.

On CUDA tensors, ``causal_conv1d_fn`` from the ``causal-conv1d`` package is used
when it imports (tried once, here); everywhere else ``F.conv1d`` with width − 1
zeros of left padding, which computes the same function.
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
    backend: str = "auto",
) -> Tensor:
    """y[b, c, t] = act(bias[c] + Σ_k weight[c, k] · x[b, c, t − (width − 1) + k]), zeros before t = 0.

    x: (batch, d, L); weight: (d, width); bias: (d,) or None;
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
    use_fused = backend == "cuda" or (backend == "auto" and x.is_cuda and _fused_causal_conv1d is not None)
    if use_fused:
        if _fused_causal_conv1d is None:
            raise RuntimeError(f"causal_conv1d backend 'cuda' unavailable: {FUSED_UNAVAILABLE_REASON}")
        if not x.is_cuda:
            raise RuntimeError(f"causal_conv1d backend 'cuda' needs CUDA tensors, got device {x.device}")
        return _fused_causal_conv1d(x, weight, bias, activation=activation)
    width = weight.shape[1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=d)
    return F.silu(y) if activation is not None else y
