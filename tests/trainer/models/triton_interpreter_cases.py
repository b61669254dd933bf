"""Kernel cases of the triton selective-scan backend, under Triton's interpreter (CPU tensors),
against a float64 loop. Run by ``test_ssm_triton.py`` in a fresh process with TRITON_INTERPRET=1
set before triton is imported (what the interpreter needs); to run them directly:

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python -m pytest -q tests/trainer/models/triton_interpreter_cases.py

The interpreter runs a scan one element at a time in Python, so sizes are tiny; ``chunk=8``
makes every sequence span several chunks (and a partial last one).
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.models.scan_reference import assert_float32_matches, reference_scan, rel_err, values_and_grads
from trainer.models.ssm import resolve_backend, selective_scan_fn, triton_scan

pytestmark = pytest.mark.skipif(
    not triton_scan.INTERPRETED,
    reason=("triton is not importable here: " + triton_scan.UNAVAILABLE_REASON) if not triton_scan.AVAILABLE
    else "needs TRITON_INTERPRET=1 set before triton is imported (tests/trainer/models/test_ssm_triton.py does that)",
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def inputs(batch=2, d_inner=2, d_state=3, L=21, *, options=True, softplus=True, seed=0) -> dict:
    """Random float64 inputs in mamba's ranges; d_state 3 exercises the padding to a power of two."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = {
        "u": r(batch, d_inner, L),
        "delta": r(batch, d_inner, L) if softplus else torch.rand(batch, d_inner, L, generator=g, dtype=torch.float64) * 0.5,
        "A": -torch.exp(torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * 2 - 1),
        "B": r(batch, d_state, L),
        "C": r(batch, d_state, L),
    }
    if options:
        x.update(D=r(d_inner), z=r(batch, d_inner, L), delta_bias=r(d_inner) * 0.5)
    return x


def cotangents(x: dict, seed=1):
    g = torch.Generator().manual_seed(seed)
    batch, d_inner, L = x["u"].shape
    return (torch.randn(batch, d_inner, L, generator=g, dtype=torch.float64),
            torch.randn(batch, d_inner, x["A"].shape[1], generator=g, dtype=torch.float64))


def triton_fn(**kw):
    return triton_scan.selective_scan(**kw, return_last_state=True)


@pytest.mark.parametrize(
    "options, softplus, with_last",
    [(True, True, True), (False, False, True), (True, True, False)],
    ids=["bias-softplus-D-z", "bare", "y-only"],
)
def test_forward_and_every_gradient_match_the_float64_loop(options, softplus, with_last):
    x = inputs(options=options, softplus=softplus)
    gy, glast = cotangents(x)
    glast = glast if with_last else None
    y_ref, last_ref, g_ref = values_and_grads(reference_scan, x, gy, glast, delta_softplus=softplus)
    x32 = {k: v.float() for k, v in x.items()}
    result = values_and_grads(triton_fn, x32, gy, glast, delta_softplus=softplus, chunk=8)
    assert_float32_matches(result, (y_ref, last_ref, g_ref))
    assert set(result[2]) == set(x)


def test_only_the_last_state_carries_gradient():
    """gy = 0: every gradient comes from last_state through the chunk carries of backward."""
    x = inputs(L=19)
    _, glast = cotangents(x)
    gy = torch.zeros_like(x["u"])
    _, _, g_ref = values_and_grads(reference_scan, x, gy, glast, delta_softplus=True)
    _, _, grads = values_and_grads(triton_fn, {k: v.float() for k, v in x.items()}, gy, glast, delta_softplus=True, chunk=8)
    for name in ("u", "delta", "A", "B", "delta_bias"):
        assert g_ref[name].abs().max() > 0, name
        assert rel_err(grads[name], g_ref[name]) < 1e-4, name
    assert grads["C"].abs().max() == 0 and grads["z"].abs().max() == 0 and grads["D"].abs().max() == 0


def test_public_function_dispatches_and_returns_u_dtype():
    """backend='triton' with the default chunk; float64 inputs are computed in float32 and returned in float64."""
    x = inputs(batch=1, L=6)
    y_ref, last_ref = reference_scan(**x, delta_softplus=True)
    y = selective_scan_fn(**x, delta_softplus=True, backend="triton")
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-5
    y2, last = selective_scan_fn(**x, delta_softplus=True, return_last_state=True, backend="triton")
    assert torch.equal(y2, y) and last.dtype == torch.float32
    assert rel_err(last, last_ref) < 1e-5


def packed_ids() -> torch.Tensor:
    """Row 0: segments of 8, 5, 8 tokens (a reset on a chunk edge and one inside a chunk);
    row 1: ids 7, 2, 7 — a reset wherever the id changes, also back to an earlier id."""
    row0 = [0] * 8 + [1] * 5 + [2] * 8
    row1 = [7] * 3 + [2] * 10 + [7] * 8
    return torch.tensor([row0, row1], dtype=torch.int32)


def segments(seq_idx: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every run of equal ids."""
    out = []
    for b, row in enumerate(seq_idx.tolist()):
        s = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[t - 1]:
                out.append((b, s, t))
                s = t
    return out


def separate_calls(fn, seq_idx, **x):
    """fn called once per segment (a (1, ·, length) slice); y reassembled, last state of each row's last segment."""
    lasts = {}
    pieces = []
    for b, s, e in segments(seq_idx):
        part = {k: (v[b : b + 1, :, s:e] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
        y, last = fn(**part)
        pieces.append(((b, s, e), y))
        lasts[b] = last[0]
    rows = [[] for _ in range(x["u"].shape[0])]
    for (b, _, _), y in pieces:
        rows[b].append(y[0])
    ys = torch.stack([torch.cat(r, dim=-1) for r in rows])
    return ys, torch.stack([lasts[b] for b in sorted(lasts)])


def test_seq_idx_packing_equals_separate_calls_values_and_gradients():
    x = {k: v.float() for k, v in inputs(L=21).items()}
    seq = packed_ids()
    gy, glast = cotangents(x)
    y_p, last_p, g_p = values_and_grads(triton_fn, x, gy, glast, delta_softplus=True, chunk=8, seq_idx=seq)
    y_s, last_s, g_s = values_and_grads(
        lambda **kw: separate_calls(lambda **p: triton_scan.selective_scan(**p, delta_softplus=True, return_last_state=True, chunk=8), seq, **kw),
        x, gy, glast,
    )
    y_ref, last_ref, g_ref = values_and_grads(reference_scan, x, gy, glast, delta_softplus=True, seq_idx=seq)
    assert rel_err(y_p, y_s) < 1e-6 and rel_err(last_p, last_s) < 1e-6
    assert rel_err(y_p, y_ref) < 1e-5 and rel_err(last_p, last_ref) < 1e-5
    for name in NAMES:
        assert rel_err(g_p[name], g_s[name]) < 1e-5, name
        assert rel_err(g_p[name], g_ref[name]) < 1e-4, name
    # Not packing would be visibly different: the resets matter.
    assert rel_err(triton_fn(**x, delta_softplus=True, chunk=8)[0], y_ref) > 1e-2


def test_constant_seq_idx_is_no_packing():
    x = {k: v.float() for k, v in inputs(batch=1, L=11).items()}
    y, last = triton_fn(**x, delta_softplus=True, chunk=8)
    y_c, last_c = triton_fn(**x, delta_softplus=True, chunk=8, seq_idx=torch.full((1, 11), 4, dtype=torch.int32))
    assert torch.equal(y, y_c) and torch.equal(last, last_c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_within_their_tolerance(dtype):
    """u, delta, B, C, z in half precision (A, D, delta_bias float32), as under autocast; the state stays float32."""
    x = inputs(L=13)
    low = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v.float()) for k, v in x.items()}
    gy, glast = cotangents(x)
    y_ref, last_ref, g_ref = values_and_grads(reference_scan, {k: v.double() for k, v in low.items()}, gy, glast, delta_softplus=True)
    y, last, grads = values_and_grads(triton_fn, low, gy, glast, delta_softplus=True, chunk=8)
    assert y.dtype == dtype and last.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3  # a few units of the format's rounding (2⁻⁸, 2⁻¹¹)
    assert rel_err(y, y_ref) < tol
    assert rel_err(last, last_ref) < 1e-5  # never rounded to the input dtype
    for name in NAMES:
        assert grads[name].dtype == low[name].dtype, name
        assert rel_err(grads[name], g_ref[name]) < tol, name


def test_saved_memory_is_the_inputs_and_one_state_per_chunk():
    x = {k: v.float().requires_grad_(True) for k, v in inputs(L=21).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        triton_fn(**x, delta_softplus=True, chunk=8)
    input_ids = {id(v) for v in x.values()}
    extra = [t for t in saved if id(t) not in input_ids]
    assert [tuple(t.shape) for t in extra] == [(2, 2, 3, 3)]  # (batch, d_inner, ⌈21/8⌉ chunks, d_state)


def test_other_backends_refuse_seq_idx_clearly():
    x = {k: v.float() for k, v in inputs(batch=1, L=5).items()}
    seq = torch.zeros(1, 5, dtype=torch.int32)
    try:
        out = selective_scan_fn(**x, seq_idx=seq, backend="torch")
    except NotImplementedError as exc:
        assert "seq_idx" in str(exc) and "'torch'" in str(exc)
    else:  # the torch backend implements packing (another engineer's work): then it must agree
        assert rel_err(out, triton_fn(**x, seq_idx=seq)[0]) < 1e-5


def test_mamba_block_runs_with_the_triton_backend():
    """The model path: the block's conv falls back to F.conv1d for 'triton' and the scan agrees with 'torch'."""
    from trainer.models.mamba_block import BidirectionalMamba, MambaBlockConfig

    torch.manual_seed(0)
    block = BidirectionalMamba(MambaBlockConfig(d_model=2, d_state=2, expand=1, ssm_backend="torch"))
    hidden = torch.randn(1, 9, 2)
    ref = block(hidden)
    block.cfg = MambaBlockConfig(d_model=2, d_state=2, expand=1, ssm_backend="triton")
    out = block(hidden)
    assert rel_err(out.detach(), ref.detach()) < 1e-5


def test_cpu_tensors_resolve_to_triton_under_the_interpreter():
    assert resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend("auto", "cpu") in ("numba", "torch")  # auto never picks the interpreter


def test_an_empty_batch_returns_empty_results_and_gradients():
    x = {k: v.float()[:0] if v.dim() == 3 else v.float() for k, v in inputs(L=5).items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    y, last = triton_fn(**leaves, delta_softplus=True)
    assert y.shape == (0, 2, 5) and last.shape == (0, 2, 3)
    y.sum().backward()
    assert leaves["u"].grad.shape == (0, 2, 5) and leaves["A"].grad.abs().sum() == 0
