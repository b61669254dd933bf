"""Selective-scan backends against a plain sequential float64 reference written here."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.models.scan_reference import assert_float32_matches, reference_scan, rel_err, values_and_grads
from trainer.models import ssm
from trainer.models.ssm import (
    BACKENDS,
    BackendUnavailableError,
    cuda_scan,
    numba_scan,
    resolve_backend,
    selective_scan_fn,
    torch_scan,
)
from trainer.models.ssm.selective import selective_scan

needs_numba = pytest.mark.skipif(not numba_scan.AVAILABLE, reason="numba is not importable")


def make_inputs(batch, d_inner, d_state, L, *, with_D, with_z, with_bias, softplus, seed=0, delta_scale=1.0, a_max=2.0):
    """Random float64 inputs in mamba's ranges (A negative; delta positive when no softplus)."""
    g = torch.Generator().manual_seed(seed)
    r = partial(torch.randn, generator=g, dtype=torch.float64)
    inputs = {
        "u": r(batch, d_inner, L),
        "delta": (r(batch, d_inner, L) * delta_scale) if softplus else torch.rand(batch, d_inner, L, generator=g, dtype=torch.float64) * 0.5 * delta_scale,
        "A": -torch.exp(torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * a_max - 1.0),
        "B": r(batch, d_state, L),
        "C": r(batch, d_state, L),
        "D": r(d_inner) if with_D else None,
        "z": r(batch, d_inner, L) if with_z else None,
        "delta_bias": (r(d_inner) * 0.5) if with_bias else None,
    }
    return inputs


def check_against_reference(core, L, with_D, with_z, with_bias, softplus, with_last, *, shapes=(2, 3, 4), **input_kw):
    batch, d_inner, d_state = shapes
    inputs = make_inputs(batch, d_inner, d_state, L, with_D=with_D, with_z=with_z, with_bias=with_bias, softplus=softplus, **input_kw)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(batch, d_inner, L, generator=g, dtype=torch.float64)
    glast = torch.randn(batch, d_inner, d_state, generator=g, dtype=torch.float64)

    glast = glast if with_last else None
    reference = values_and_grads(reference_scan, inputs, gy, glast, delta_softplus=softplus)
    inputs32 = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    result = values_and_grads(
        lambda **kw: selective_scan(core, **kw, return_last_state=True), inputs32, gy, glast, delta_softplus=softplus
    )
    assert_float32_matches(result, reference)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 13, 32, 33])
def test_pair_scans_match_loops(T):
    """The odd–even scans behind the torch core, forward and reverse, for even and odd lengths."""
    g = torch.Generator().manual_seed(T)
    w = torch.rand(T - 1, 2, 3, generator=g, dtype=torch.float64)
    x = torch.randn(T, 2, 3, generator=g, dtype=torch.float64)
    fwd, rev = x.clone(), x.clone()
    for k in range(1, T):
        fwd[k] = w[k - 1] * fwd[k - 1] + x[k]
    for k in range(T - 2, -1, -1):
        rev[k] = w[k] * rev[k + 1] + x[k]
    torch.testing.assert_close(torch_scan.linear_scan(w, x.clone()), fwd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch_scan.linear_scan_reverse(w, x.clone()), rev, rtol=1e-12, atol=1e-12)


def test_chunk_length_is_a_bounded_power_of_two():
    assert torch_scan.chunk_length(1, 6, 16) == 256
    assert torch_scan.chunk_length(1, 384, 16) == 32
    assert torch_scan.chunk_length(64, 768, 16) == torch_scan.MIN_CHUNK
    with pytest.raises(ValueError, match="chunk must be"):
        torch_scan.scan_core(*(torch.zeros(1, 2, 3),) * 2, torch.zeros(2, 4), *(torch.zeros(1, 4, 3),) * 2, chunk=0)


CORES = {
    "torch": partial(torch_scan.scan_core, chunk=16),
    "numba": pytest.param(partial(numba_scan.scan_core, checkpoint_every=16), marks=needs_numba) if numba_scan.AVAILABLE else pytest.param(None, marks=needs_numba),
}
OPTIONS = [  # (with_D, with_z, with_bias, softplus, with_last)
    (False, False, False, False, False),
    (True, True, True, True, True),
    (True, False, True, False, True),
    (False, True, False, True, False),
]


@pytest.mark.parametrize("core", list(CORES.values()), ids=list(CORES))
@pytest.mark.parametrize("L", [1, 16, 37])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "".join("DzbsL"[i] if v else "-" for i, v in enumerate(o)))
def test_core_matches_sequential_reference(core, L, options):
    check_against_reference(core, L, *options)


@pytest.mark.parametrize("core", list(CORES.values()), ids=list(CORES))
def test_reference_on_many_chunks(core):
    """Many chunk boundaries (chunk/checkpoint 16) and a ragged last chunk."""
    check_against_reference(core, 165, True, True, True, True, True, shapes=(1, 5, 8))


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
def test_public_function_default_chunking(backend):
    """selective_scan_fn with a backend name: same values as the reference, y in u's dtype."""
    inputs = make_inputs(2, 4, 16, 300, with_D=True, with_z=True, with_bias=True, softplus=True)
    y_ref, last_ref = reference_scan(**inputs, delta_softplus=True)
    i32 = {k: v.float() for k, v in inputs.items()}
    y, last = selective_scan_fn(**i32, delta_softplus=True, return_last_state=True, backend=backend)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(last, last_ref) < 1e-5
    y_only = selective_scan_fn(**i32, delta_softplus=True, backend=backend)
    assert isinstance(y_only, torch.Tensor) and torch.equal(y_only, y)


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
def test_half_precision_inputs_return_u_dtype(backend):
    inputs = make_inputs(1, 4, 8, 40, with_D=True, with_z=True, with_bias=True, softplus=True)
    y_ref, _ = reference_scan(**inputs, delta_softplus=True)
    bf = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "z", "B", "C") else v.float()) for k, v in inputs.items()}
    y, last = selective_scan_fn(**bf, delta_softplus=True, return_last_state=True, backend=backend)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert rel_err(y, y_ref) < 5e-2  # bf16 inputs and output


@pytest.mark.parametrize("core", list(CORES.values()), ids=list(CORES))
def test_stability_large_delta_strongly_negative_A(core):
    """|Σ delta·A| reaches ~1e5 over the sequence: a cumsum-of-log-decay scan would overflow fp32."""
    L = 1500
    inputs = make_inputs(1, 2, 6, L, with_D=True, with_z=False, with_bias=True, softplus=True, seed=3, delta_scale=3.0, a_max=5.5)
    inputs["delta_bias"] = torch.tensor([4.0, -3.0], dtype=torch.float64)  # one channel with long memory
    inputs["A"][:, 0] = -100.0
    inputs["A"][:, 1] = -1e-3
    total_log_decay = (F.softplus(inputs["delta"] + inputs["delta_bias"][:, None]).sum(-1)[0] * 100.0).max()
    assert total_log_decay > 1e4
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(1, 2, L, generator=g, dtype=torch.float64)
    glast = torch.ones(1, 2, 6, dtype=torch.float64)
    y_ref, last_ref, g_ref = values_and_grads(reference_scan, inputs, gy, glast, delta_softplus=True)
    inputs32 = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    y, last, grads = values_and_grads(
        lambda **kw: selective_scan(core, **kw, return_last_state=True), inputs32, gy, glast, delta_softplus=True
    )
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert rel_err(y, y_ref) < 1e-5
    for name in g_ref:
        assert torch.isfinite(grads[name]).all(), name
        assert rel_err(grads[name], g_ref[name]) < 1e-4, name


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize(
    "core, per_chunk",
    [(partial(torch_scan.scan_core, chunk=64), 64), pytest.param(partial(numba_scan.scan_core, checkpoint_every=64), 64, marks=needs_numba)],
    ids=["torch", "numba"],
)
def test_saved_memory_is_bounded_by_the_chunk(core, per_chunk):
    """Saved bytes per token grow with d_state only through B, C and one state per chunk — never a state per token."""
    d_inner = 32

    def per_token(d_state):
        sizes = []
        for L in (512, 1024):
            x = make_inputs(1, d_inner, d_state, L, with_D=True, with_z=True, with_bias=True, softplus=True)
            x = {k: v.float().requires_grad_(True) for k, v in x.items()}
            sizes.append(saved_bytes(lambda: selective_scan(core, **x, delta_softplus=True)))
        return (sizes[1] - sizes[0]) / 512

    small, large = per_token(16), per_token(64)
    extra_state = 64 - 16
    allowed = 4 * (2 * extra_state + d_inner * extra_state / per_chunk) + 16  # B, C and chunk boundary states
    assert large - small <= allowed
    assert large - small < 4 * d_inner * extra_state / 10  # a state per token would cost 4·d·Δn bytes


def test_forced_cuda_without_mamba_ssm_raises_clearly(monkeypatch):
    monkeypatch.setattr(cuda_scan, "AVAILABLE", False)
    monkeypatch.setattr(cuda_scan, "UNAVAILABLE_REASON", "mamba-ssm could not be imported (ImportError: no selective_scan_cuda)")
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable: mamba-ssm could not be imported"):
        resolve_backend("cuda", "cuda")
    x = make_inputs(1, 2, 4, 5, with_D=False, with_z=False, with_bias=False, softplus=False)
    with pytest.raises(BackendUnavailableError, match="mamba-ssm"):
        selective_scan_fn(**{k: v.float() for k, v in x.items() if v is not None}, backend="cuda")


def test_cuda_backend_really_unavailable_here_names_the_reason():
    if cuda_scan.AVAILABLE:
        pytest.skip("mamba-ssm imports here")
    assert "mamba-ssm could not be imported" in cuda_scan.UNAVAILABLE_REASON
    with pytest.raises(BackendUnavailableError, match="mamba-ssm"):
        resolve_backend("cuda", "cpu")


def test_resolve_backend_choices(monkeypatch):
    assert BACKENDS == ("auto", "torch", "numba", "cuda", "triton")
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown selective-scan backend 'mamba'"):
        resolve_backend("mamba", "cpu")
    expected_cpu = "numba" if numba_scan.AVAILABLE else "torch"
    assert resolve_backend("auto", "cpu") == expected_cpu
    on_gpu = "cuda" if cuda_scan.AVAILABLE else "triton" if ssm.triton_scan.AVAILABLE else "torch"
    assert resolve_backend("auto", torch.device("cuda")) == on_gpu
    monkeypatch.setattr(numba_scan, "AVAILABLE", False)
    monkeypatch.setattr(numba_scan, "UNAVAILABLE_REASON", "numba could not be imported (ImportError: x)")
    ssm._numba_self_check.cache_clear()
    try:
        assert resolve_backend("auto", "cpu") == "torch"
        with pytest.raises(BackendUnavailableError, match="'numba' is unavailable: numba could not be imported"):
            resolve_backend("numba", "cpu")
    finally:
        ssm._numba_self_check.cache_clear()


@needs_numba
def test_numba_refuses_gpu_tensors():
    with pytest.raises(BackendUnavailableError, match="CPU tensors only"):
        resolve_backend("numba", "cuda")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: x.update(B=x["B"][:, :, :-1]), "B must be"),
        (lambda x: x.update(A=x["A"][:-1]), "A must be"),
        (lambda x: x.update(delta=x["delta"][..., :-1]), "delta must have u's shape"),
        (lambda x: x.update(D=torch.ones(7)), "D must be"),
        (lambda x: x.update(z=x["z"][:1]), "z must have u's shape"),
        (lambda x: x.update(u=x["u"][0]), "u must be"),
        (lambda x: x.update(u=x["u"].long()), "u must be a floating-point tensor"),
    ],
)
def test_bad_shapes_are_named(change, message):
    x = {k: v.float() for k, v in make_inputs(2, 3, 4, 6, with_D=True, with_z=True, with_bias=True, softplus=True).items()}
    change(x)
    with pytest.raises(ValueError, match=message):
        selective_scan_fn(**x, backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_backend_on_cuda_matches_reference():
    inputs = make_inputs(2, 8, 16, 300, with_D=True, with_z=True, with_bias=True, softplus=True)
    y_ref, last_ref = reference_scan(**inputs, delta_softplus=True)
    x = {k: v.float().cuda() for k, v in inputs.items()}
    y, last = selective_scan_fn(**x, delta_softplus=True, return_last_state=True, backend="torch")
    assert rel_err(y.cpu(), y_ref) < 1e-5 and rel_err(last.cpu(), last_ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and cuda_scan.AVAILABLE), reason="needs CUDA and mamba-ssm")
def test_cuda_and_torch_backends_agree():
    inputs = make_inputs(2, 8, 16, 500, with_D=True, with_z=True, with_bias=True, softplus=True)
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(2, 8, 500, generator=g).cuda()
    results = {}
    for backend in ("torch", "cuda"):
        leaves = {k: v.float().cuda().requires_grad_(True) for k, v in inputs.items()}
        y, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
        (y * gy).sum().backward()
        results[backend] = (y.detach(), last.detach(), {k: v.grad for k, v in leaves.items()})
    (y_t, l_t, g_t), (y_c, l_c, g_c) = results["torch"], results["cuda"]
    assert rel_err(y_c, y_t) < 1e-4 and rel_err(l_c, l_t) < 1e-4
    for name in g_t:
        assert rel_err(g_c[name], g_t[name]) < 1e-3, name
