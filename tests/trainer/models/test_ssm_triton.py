"""The triton selective-scan backend: its kernel cases under Triton's interpreter, run in a fresh
process, and the backend's rules (availability, the auto choice, input errors) here.

Triton's interpreter works only when TRITON_INTERPRET=1 is set before triton is first imported
(triton.jit and Triton's own library functions choose interpreted code when they are decorated),
and in this process triton was imported, compiled-mode, with ``trainer.models.ssm``. So the kernel
cases (``triton_interpreter_cases.py``) run in a child pytest with the variable set, and no other
test file sees a changed environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.trainer.models.scan_reference import rel_err, values_and_grads
from trainer.models import ssm
from trainer.models.ssm import BackendUnavailableError, cuda_scan, resolve_backend, selective_scan_fn, triton_scan

pytestmark = pytest.mark.skipif(not triton_scan.AVAILABLE, reason=f"triton is not importable here: {triton_scan.UNAVAILABLE_REASON}")

CASES = Path(__file__).with_name("triton_interpreter_cases.py")
REPO = Path(__file__).resolve().parents[3]


def test_kernel_cases_pass_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(CASES)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=580,
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in report and "skipped" not in report, report


def small_inputs(L: int = 5) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "u": torch.randn(1, 2, L, generator=g),
        "delta": torch.randn(1, 2, L, generator=g),
        "A": -torch.rand(2, 3, generator=g) - 0.1,
        "B": torch.randn(1, 3, L, generator=g),
        "C": torch.randn(1, 3, L, generator=g),
    }


def test_bad_seq_idx_and_chunk_are_named():
    x = small_inputs()
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch=1, L=5\)"):
        triton_scan.selective_scan(**x, seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="integer tensor"):
        triton_scan.selective_scan(**x, seq_idx=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="power of two"):
        triton_scan.selective_scan(**x, chunk=12)


def test_cpu_tensors_need_the_interpreter_from_import_on(monkeypatch):
    assert "triton" in ssm.BACKENDS
    assert resolve_backend("triton", "cuda") == "triton"
    if triton_scan.INTERPRETED:
        pytest.skip("this process imported triton under TRITON_INTERPRET=1")
    with pytest.raises(BackendUnavailableError, match="'triton' is unavailable: .*TRITON_INTERPRET=1 before triton is first imported"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late for this process: said so
    with pytest.raises(RuntimeError, match="it is set now, but triton was imported before"):
        triton_scan.selective_scan(**small_inputs())
    assert resolve_backend("auto", "cpu") in ("numba", "torch")  # CPU choice unchanged


def test_missing_triton_is_named(monkeypatch):
    monkeypatch.setattr(triton_scan, "AVAILABLE", False)
    monkeypatch.setattr(triton_scan, "UNAVAILABLE_REASON", "triton could not be imported (ImportError: x)")
    with pytest.raises(BackendUnavailableError, match="triton could not be imported.*pip install triton"):
        resolve_backend("triton", "cuda")


def test_auto_on_cuda_prefers_mamba_ssm_unless_packed(monkeypatch):
    monkeypatch.setattr(cuda_scan, "AVAILABLE", True)
    assert resolve_backend("auto", "cuda") == "cuda"
    assert resolve_backend("auto", "cuda", packed=True) == "triton"
    monkeypatch.setattr(cuda_scan, "AVAILABLE", False)
    assert resolve_backend("auto", "cuda") == "triton"
    monkeypatch.setattr(triton_scan, "AVAILABLE", False)
    assert resolve_backend("auto", "cuda") == "torch"


INT_ARGS = {"L", "d_inner", "d_state", "n_chunks"}
INPUT_PTRS = ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "gout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")


@pytest.mark.parametrize("kernel", ["scan_fwd_kernel", "scan_bwd_kernel"])
@pytest.mark.parametrize("options, dtype", [(True, "bf16"), (False, "fp32")], ids=["all-options-bf16", "bare-fp32"])
def test_kernels_compile_for_a_gpu_without_one(kernel, options, dtype):
    """The compiled (not interpreted) kernels, built ahead of time for sm_90 down to a cubin on this CPU
    machine: catches what the interpreter lets through (types across loop iterations, static branches, ...)."""
    if triton_scan.INTERPRETED:
        pytest.skip("this process imported triton under TRITON_INTERPRET=1: no compiled kernels")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API ({exc})")
    fn = getattr(triton_scan.triton_kernels, kernel)
    flags = {"HAS_D": options, "HAS_Z": options, "HAS_BIAS": options, "HAS_SEQ": options, "SOFTPLUS": options,
             "BLOCK_T": triton_scan.CUDA_CHUNK, "BLOCK_N": 16}
    flags["SAVE_STATES" if kernel == "scan_fwd_kernel" else "HAS_GLAST"] = True
    signature = {
        name: "constexpr" if name in flags else "i32" if name in INT_ARGS else "*i32" if name == "seq_ptr"
        else f"*{dtype}" if name in INPUT_PTRS else "*fp32"
        for name in fn.arg_names
    }
    options_ = triton_scan.launch_options(triton_scan.CUDA_CHUNK, torch.device("cuda"))
    compiled = triton.compile(ASTSource(fn, signature, constexprs=flags), target=GPUTarget("cuda", 90, 32), options=options_)
    assert compiled.asm.get("cubin"), "no cubin was produced"
    assert f".entry {kernel}" in compiled.asm["ptx"]
    usage = _resource_usage(compiled.asm["cubin"])
    if usage is not None:  # a spill to local memory would cost every token a round trip to DRAM
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, usage


def _resource_usage(cubin: bytes) -> dict | None:
    """{"REG": n, "LOCAL": bytes, "STACK": bytes, ...} of a cubin's kernel, read by the cuobjdump Triton
    ships with its NVIDIA backend; None where this triton has none."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True).stdout
    fields = re.findall(r"\b([A-Z]+):(\d+)", next(line for line in text.splitlines() if "REG:" in line))
    return {name: int(value) for name, value in fields}


def _cuda_inputs(batch: int, d_inner: int, d_state: int, L: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {
        "u": torch.randn(batch, d_inner, L, generator=g), "delta": torch.randn(batch, d_inner, L, generator=g),
        "A": -torch.exp(torch.rand(d_inner, d_state, generator=g) * 2 - 1),
        "B": torch.randn(batch, d_state, L, generator=g), "C": torch.randn(batch, d_state, L, generator=g),
        "D": torch.randn(d_inner, generator=g), "z": torch.randn(batch, d_inner, L, generator=g),
        "delta_bias": torch.randn(d_inner, generator=g) * 0.5,
    }
    return {k: v.cuda() for k, v in x.items()}


def _values_and_grads(x: dict, backend: str, gy: torch.Tensor, **kw):
    return values_and_grads(selective_scan_fn, x, gy, None, delta_softplus=True, return_last_state=True, backend=backend, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("d_state", [16, 3])
def test_compiled_triton_agrees_with_torch_on_cuda(d_state):
    x = _cuda_inputs(2, 8, d_state, 500)
    gy = torch.randn_like(x["u"])
    (y_t, l_t, g_t), (y_k, l_k, g_k) = (_values_and_grads(x, b, gy) for b in ("torch", "triton"))
    assert rel_err(y_k, y_t) < 1e-4 and rel_err(l_k, l_t) < 1e-4
    for name in g_t:
        assert rel_err(g_k[name], g_t[name]) < 1e-3, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_triton_packing_equals_separate_calls_on_cuda():
    x = _cuda_inputs(1, 8, 16, 500, seed=1)
    seq = torch.zeros(1, 500, dtype=torch.int32, device="cuda")
    seq[:, 130:] = 1  # one reset inside a chunk
    gy = torch.randn_like(x["u"])
    y_p, _, g_p = _values_and_grads(x, "triton", gy, seq_idx=seq)
    parts = [
        _values_and_grads({k: (v[..., s:e].contiguous() if v.dim() == 3 else v) for k, v in x.items()}, "triton", gy[..., s:e])
        for s, e in ((0, 130), (130, 500))
    ]
    assert rel_err(y_p, torch.cat([p[0] for p in parts], -1)) < 1e-5
    for name in g_p:
        sep = torch.cat([p[2][name] for p in parts], -1) if x[name].dim() == 3 else parts[0][2][name] + parts[1][2][name]
        assert rel_err(g_p[name], sep) < 1e-4, name
