"""Depthwise causal conv1d against a direct float64 sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.models.ssm import causal_conv1d, conv


def reference_conv(x, weight, bias, activation):
    """y[b, c, t] = bias[c] + Σ_k weight[c, k] · x[b, c, t − (width − 1) + k], x = 0 before t = 0."""
    batch, d, L = x.shape
    width = weight.shape[1]
    y = torch.zeros_like(x)
    for t in range(L):
        for k in range(width):
            src = t - (width - 1) + k
            if src >= 0:
                y[:, :, t] += weight[:, k] * x[:, :, src]
    if bias is not None:
        y = y + bias[:, None]
    return F.silu(y) if activation else y


@pytest.mark.parametrize("L", [1, 3, 11])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
def test_matches_direct_sum_and_grads(L, with_bias, activation):
    g = torch.Generator().manual_seed(L)
    x = torch.randn(2, 5, L, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = causal_conv1d(x, w, b, activation, backend="torch")
    y_ref = reference_conv(x, w, b, activation)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    params = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad((y * gy).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), params)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_is_causal():
    """Changing x at time t changes no output before t."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 20, generator=g)
    w = torch.randn(3, 4, generator=g)
    y = causal_conv1d(x, w, None, None, backend="auto")
    x2 = x.clone()
    x2[:, :, 12] += 5.0
    y2 = causal_conv1d(x2, w, None, None, backend="auto")
    assert torch.equal(y[:, :, :12], y2[:, :, :12])
    assert not torch.equal(y[:, :, 12:16], y2[:, :, 12:16])


def test_numba_name_uses_the_torch_path():
    x, w = torch.randn(1, 3, 9), torch.randn(3, 4)
    assert torch.equal(causal_conv1d(x, w, backend="numba"), causal_conv1d(x, w, backend="torch"))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x=torch.randn(3, 9)), ValueError, "x must be"),
        (dict(weight=torch.randn(4, 4)), ValueError, "weight must be"),
        (dict(bias=torch.randn(4)), ValueError, "bias must be"),
        (dict(activation="relu"), ValueError, "activation must be"),
        (dict(backend="triton"), ValueError, "unknown causal_conv1d backend"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    args = dict(x=torch.randn(1, 3, 9), weight=torch.randn(3, 4), bias=torch.randn(3), activation="silu", backend="torch")
    args.update(kwargs)
    with pytest.raises(error, match=message):
        causal_conv1d(**args)


def test_forced_cuda_without_the_package_raises(monkeypatch):
    monkeypatch.setattr(conv, "_fused_causal_conv1d", None)
    monkeypatch.setattr(conv, "FUSED_UNAVAILABLE_REASON", "causal-conv1d could not be imported (ImportError: x)")
    with pytest.raises(RuntimeError, match="'cuda' unavailable: causal-conv1d could not be imported"):
        causal_conv1d(torch.randn(1, 3, 9), torch.randn(3, 4), backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and conv._fused_causal_conv1d is not None), reason="needs CUDA and causal-conv1d")
def test_fused_cuda_matches_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 300, generator=g).cuda()
    w, b = torch.randn(64, 4, generator=g).cuda(), torch.randn(64, generator=g).cuda()
    torch.testing.assert_close(causal_conv1d(x, w, b, backend="cuda"), causal_conv1d(x, w, b, backend="torch"), rtol=1e-4, atol=1e-5)
