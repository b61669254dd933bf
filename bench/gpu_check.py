"""GPU check: the selective-scan backends and Pixel-Mamba on one CUDA GPU, in one short run.

Sections, in order (each has its own time guard; the whole run stays under ``--budget-s``,
240 s by default; results are printed and rewritten to the JSON file after every record):

  env    torch / triton / GPU / mamba-ssm versions and availability;
  scan   selective scan fwd and fwd+bwd time, torch vs triton (vs mamba-ssm's "cuda" where it
         imports), L = 50,177 × d_inner 6 and L = 6,272 × d_inner 384 (d_state 16, batch 1 and 32),
         with each backend's disagreement against torch (y and every gradient), and triton's
         seq_idx packing against separate calls;
  model  pixel_mamba_6m fwd+bwd time and peak memory at 32 / 128 / 512 / 1,024 regions,
         Region Fusion on, bf16 autocast, without and with activation checkpointing (all layers);
  dino   one DINO-shaped step — student fwd+bwd over 2 global + 6 local views, teacher forward
         over the 2 global views — with the views packed into one call
         (``model(regions, segments=seg)``, where the model has it) vs one call per view.

A step that would not fit the section's remaining time (estimated from the previous,
smaller one) is skipped and says so; an out-of-memory step is recorded as "OOM" and
the run goes on. Runs on any recent torch and Triton (≥ 3.0).

    python bench/gpu_check.py                          # CUDA GPU: every section, bench/out/gpu_check.json
    python bench/gpu_check.py --sections scan model --budget-s 120
    python bench/gpu_check.py --cpu-smoke              # CPU, tiny sizes, torch backend: checks every section runs
    TRITON_INTERPRET=1 python bench/gpu_check.py --cpu-smoke   # the same, plus the triton rows under Triton's interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.models import build_model
from trainer.models.registry import get_config
from trainer.models.ssm import BackendUnavailableError, resolve_backend, selective_scan_fn

SECTIONS = ("env", "scan", "model", "dino")
D_STATE = 16


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Sizes and budgets of one run (GPU defaults, or the CPU smoke test's tiny ones)."""

    device: torch.device
    scan_shapes: tuple[tuple[int, int, int], ...]  # (batch, L, d_inner)
    scan_reps: int
    model: str
    regions: tuple[int, ...]
    views: tuple[int, int]  # regions per global view, per local view
    autocast: bool
    section_s: dict


GPU_PLAN = dict(
    scan_shapes=((1, 50_177, 6), (32, 50_177, 6), (1, 6_272, 384), (32, 6_272, 384)),
    scan_reps=3, model="pixel_mamba_6m", regions=(32, 128, 512, 1024), views=(64, 16), autocast=True,
    section_s={"env": 5, "scan": 60, "model": 110, "dino": 60},
)
SMOKE_PLAN = dict(
    scan_shapes=((1, 257, 6), (2, 64, 24)),
    scan_reps=1, model="pixel_mamba_tiny", regions=(2, 4), views=(3, 1), autocast=False,
    section_s={"env": 5, "scan": 60, "model": 120, "dino": 120},
)


class Recorder:
    """Collects records per section, prints each and rewrites the JSON file after each."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, record: dict) -> None:
        self.data["sections"].setdefault(section, []).append(record)
        print(f"[{section}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in record.items()), flush=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Guard:
    """A section's time budget: ``fits(estimate_s)`` says whether a step of that length still fits."""

    def __init__(self, budget_s: float, deadline: float):
        self.end = min(time.perf_counter() + budget_s, deadline)

    def left(self) -> float:
        return self.end - time.perf_counter()

    def fits(self, estimate_s: float = 0.0) -> bool:
        return self.left() > estimate_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def scan_backends(device: torch.device) -> tuple[list[str], dict]:
    """Backends that can run on ``device`` ("torch" first) and why each other one cannot."""
    names, missing = ["torch"], {}
    for name in ("triton", "cuda"):
        try:
            resolve_backend(name, device)
            names.append(name)
        except BackendUnavailableError as exc:
            missing[name] = str(exc)
    return names, missing


# --- env -------------------------------------------------------------------------------------

def section_env(plan: Plan, rec: Recorder, guard: Guard) -> None:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"unavailable ({type(exc).__name__})"
    cuda = plan.device.type == "cuda"
    backends, missing = scan_backends(plan.device)
    rec.add("env", {
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "gpu_mem_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "scan_backends": backends, "unavailable": missing,
    })


# --- scan ------------------------------------------------------------------------------------

def scan_inputs(batch: int, L: int, d: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = dict(
        u=torch.randn(batch, d, L, generator=g), delta=torch.randn(batch, d, L, generator=g) - 2.0,
        A=-torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(d, 1),
        B=torch.randn(batch, D_STATE, L, generator=g), C=torch.randn(batch, D_STATE, L, generator=g),
        D=torch.ones(d), z=torch.randn(batch, d, L, generator=g), delta_bias=torch.randn(d, generator=g) * 0.1,
    )
    return {k: v.to(device) for k, v in x.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def scan_run(x: dict, backend: str, gy: torch.Tensor, **kw) -> tuple[torch.Tensor, dict]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
    y = selective_scan_fn(**leaves, delta_softplus=True, backend=backend, **kw)
    y.backward(gy)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def time_scan(x: dict, backend: str, reps: int, device: torch.device) -> dict:
    gy = torch.randn_like(x["u"])
    t0 = time.perf_counter()
    scan_run(x, backend, gy)  # warm-up: Triton compiles its kernels here
    _sync(device)
    first = time.perf_counter() - t0
    fwd, fwdbwd = [], []
    for _ in range(reps):
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            selective_scan_fn(**x, delta_softplus=True, backend=backend)
            _sync(device)
            fwd.append(time.perf_counter() - t0)
        _peak_reset(device)
        t0 = time.perf_counter()
        scan_run(x, backend, gy)
        _sync(device)
        fwdbwd.append(time.perf_counter() - t0)
    return {"first_call_s": first, "fwd_ms": 1e3 * min(fwd), "fwdbwd_ms": 1e3 * min(fwdbwd), "peak_gib": _peak_gib(device)}


def section_scan(plan: Plan, rec: Recorder, guard: Guard) -> None:
    backends, missing = scan_backends(plan.device)
    for name, why in missing.items():
        rec.add("scan", {"backend": name, "status": "unavailable", "why": why})
    last_s = 0.0
    for batch, L, d in plan.scan_shapes:
        x = scan_inputs(batch, L, d, plan.device)
        gy = torch.randn_like(x["u"])
        ref = None
        for backend in backends:
            row = {"backend": backend, "batch": batch, "L": L, "d_inner": d, "d_state": D_STATE}
            if not guard.fits(3 * last_s):
                rec.add("scan", {**row, "status": "skipped (time guard)"})
                continue
            t0 = time.perf_counter()
            try:
                row.update(time_scan(x, backend, plan.scan_reps, plan.device))
                y, grads = scan_run(x, backend, gy)
                if backend == "torch":
                    ref = (y, grads)
                elif ref is not None:
                    row["rel_err_y_vs_torch"] = _rel(y, ref[0])
                    row["max_rel_err_grad_vs_torch"] = max(_rel(grads[k], ref[1][k]) for k in grads)
                row["status"] = "ok"
            except Exception as exc:
                row["status"] = "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {exc}"
                _free(plan.device)
            last_s = max(last_s, (time.perf_counter() - t0) / (plan.scan_reps + 2))
            rec.add("scan", row)
        del x, gy, ref
        _free(plan.device)
    if "triton" in backends and guard.fits(5.0):
        rec.add("scan", {"check": "triton seq_idx packing vs separate calls", **packing_check(plan.device)})


def packing_check(device: torch.device) -> dict:
    """Two sequences of 300 and 700 tokens packed into one row vs one call each: max relative difference."""
    x = scan_inputs(1, 1000, 8, device, seed=1)
    seq = torch.zeros(1, 1000, dtype=torch.int32, device=device)
    seq[:, 300:] = 1
    gy = torch.randn_like(x["u"])
    try:
        y_p, g_p = scan_run(x, "triton", gy, seq_idx=seq)
        ys, gs = [], []
        for s, e in ((0, 300), (300, 1000)):
            part = {k: (v[..., s:e].contiguous() if v.dim() == 3 else v) for k, v in x.items()}
            y, g = scan_run(part, "triton", gy[..., s:e].contiguous())
            ys.append(y)
            gs.append(g)
        y_s = torch.cat(ys, -1)
        g_s = {k: (torch.cat([g[k] for g in gs], -1) if x[k].dim() == 3 else gs[0][k] + gs[1][k]) for k in x}
        return {"rel_err_y": _rel(y_p, y_s), "max_rel_err_grad": max(_rel(g_p[k], g_s[k]) for k in x), "status": "ok"}
    except Exception as exc:
        return {"status": f"error: {type(exc).__name__}: {exc}"}


# --- model -----------------------------------------------------------------------------------

def model_step(model, n: int, device: torch.device, generator: torch.Generator, use_autocast: bool) -> dict:
    """One training-mode forward + backward on n random regions; times in s, peak memory in GiB (CUDA)."""
    r = model.config.region_size
    regions = torch.randint(0, 256, (n, r, r, 3), dtype=torch.uint8, device=device)
    model.zero_grad(set_to_none=True)
    _peak_reset(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    t0 = time.perf_counter()
    with amp:
        out = model(regions, generator=generator)
        loss = out.logits.float().logsumexp(0) + out.spatial_tokens.float().mean()
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    return {"fwd_s": t1 - t0, "bwd_s": t2 - t1, "peak_gib": _peak_gib(device),
            "survivors": int(out.cls_tokens.shape[0]), "finite_grads": finite}


def _model_backends(plan: Plan) -> list[str]:
    if plan.device.type != "cuda":
        return ["torch"]
    backends, _ = scan_backends(plan.device)
    return [b for b in ("triton", "cuda", "torch") if b in backends]  # the one this issue is about first


def section_model(plan: Plan, rec: Recorder, guard: Guard) -> None:
    for backend in _model_backends(plan):
        for ckpt in (False, True):
            row0 = {"model": plan.model, "backend": backend, "checkpoint": ckpt, "region_fusion": True,
                    "bf16_autocast": plan.autocast}
            if not guard.fits(5.0):
                rec.add("model", {**row0, "status": "skipped (time guard)"})
                continue
            try:
                torch.manual_seed(0)
                layers = len(get_config(plan.model).layers) if ckpt else 0
                model = build_model(plan.model, num_classes=2, region_fusion=True, ssm_backend=backend,
                                    checkpoint_layers=layers).to(plan.device).train()
                generator = torch.Generator(device=plan.device).manual_seed(0)
                model_step(model, 2, plan.device, generator, plan.autocast)  # warm-up: kernels, allocator
            except Exception as exc:
                rec.add("model", {**row0, "status": f"error: {type(exc).__name__}: {exc}"})
                continue
            last = None  # (regions, seconds) of the previous step
            for n in plan.regions:
                row = {**row0, "regions": n}
                estimate = 0.0 if last is None else last[1] * n / last[0]
                if not guard.fits(estimate):
                    rec.add("model", {**row, "status": f"skipped (time guard: ~{estimate:.0f} s, {guard.left():.0f} s left)"})
                    break
                try:
                    result = model_step(model, n, plan.device, generator, plan.autocast)
                except Exception as exc:
                    if not _is_oom(exc):
                        rec.add("model", {**row, "status": f"error: {type(exc).__name__}: {exc}"})
                        break
                    rec.add("model", {**row, "status": "OOM"})
                    _free(plan.device)
                    break
                rec.add("model", {**row, **result, "status": "ok"})
                last = (n, result["fwd_s"] + result["bwd_s"])
            del model
            _free(plan.device)


# --- dino ------------------------------------------------------------------------------------

def dino_views(plan: Plan, r: int, generator: torch.Generator) -> list[torch.Tensor]:
    n_global, n_local = plan.views
    sizes = [n_global] * 2 + [n_local] * 6
    return [torch.randint(0, 256, (k, r, r, 3), dtype=torch.uint8, device=plan.device, generator=generator) for k in sizes]


def _view_outputs(model, views: list[torch.Tensor], packed: bool, generator: torch.Generator) -> list:
    if not packed:
        return [model(v, generator=generator) for v in views]
    segments = torch.cat([torch.full((v.shape[0],), i, dtype=torch.long, device=v.device) for i, v in enumerate(views)])
    outs = model(torch.cat(views), segments=segments, generator=generator)
    if not isinstance(outs, (list, tuple)) or len(outs) != len(views):
        raise TypeError(f"packed call returned {type(outs).__name__}, not one output per view")
    return list(outs)


def dino_step(model, views: list[torch.Tensor], packed: bool, plan: Plan, generator: torch.Generator) -> dict:
    """Teacher forward (no grad) on the 2 global views, student forward + backward on all 8."""
    model.zero_grad(set_to_none=True)
    _peak_reset(plan.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if plan.autocast else contextlib.nullcontext()
    t0 = time.perf_counter()
    with amp:
        with torch.no_grad():
            teacher = _view_outputs(model, views[:2], packed, generator)
        student = _view_outputs(model, views, packed, generator)
        target = torch.stack([o.embedding.float() for o in teacher]).mean(0)
        loss = sum(((o.embedding.float() - target) ** 2).mean() for o in student)
    loss.backward()
    _sync(plan.device)
    return {"step_s": time.perf_counter() - t0, "peak_gib": _peak_gib(plan.device)}


def section_dino(plan: Plan, rec: Recorder, guard: Guard) -> None:
    backend = "triton" if "triton" in _model_backends(plan) else "torch"
    torch.manual_seed(0)
    model = build_model(plan.model, num_classes=0, region_fusion=True, ssm_backend=backend).to(plan.device).train()
    generator = torch.Generator(device=plan.device).manual_seed(0)
    views = dino_views(plan, model.config.region_size, generator)
    base = {"model": plan.model, "backend": backend, "global_views": f"2 × {plan.views[0]}",
            "local_views": f"6 × {plan.views[1]}", "student_regions": sum(v.shape[0] for v in views)}
    times = {}
    for packed in (False, True):
        row = {**base, "packed": packed}
        if packed and "segments" not in inspect.signature(model.forward).parameters:
            rec.add("dino", {**row, "status": "unavailable: PixelMamba.forward has no segments= (packed views) argument"})
            continue
        if not guard.fits(2 * times.get(False, 0.0)):
            rec.add("dino", {**row, "status": "skipped (time guard)"})
            continue
        try:
            dino_step(model, [v[:1] for v in views], packed, plan, generator)  # warm-up
            result = dino_step(model, views, packed, plan, generator)
        except Exception as exc:
            rec.add("dino", {**row, "status": "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {exc}"})
            _free(plan.device)
            continue
        times[packed] = result["step_s"]
        rec.add("dino", {**row, **result, "status": "ok"})
    if len(times) == 2:
        rec.add("dino", {**base, "packed_speedup": times[False] / times[True]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--budget-s", type=float, default=240.0, help="whole-run time limit in seconds (default 240)")
    p.add_argument("--json", type=Path, default=Path("bench/out/gpu_check.json"), help="results file, rewritten as it goes")
    p.add_argument("--cpu-smoke", "--dry-run", dest="cpu_smoke", action="store_true",
                   help="CPU, tiny sizes, torch backend: checks that every section runs (no GPU figures)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    deadline = start + args.budget_s - 5.0  # the last record and the file write
    if args.cpu_smoke:
        plan = Plan(device=torch.device("cpu"), **SMOKE_PLAN)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --cpu-smoke to check the script on CPU")
    else:
        plan = Plan(device=torch.device("cuda"), **GPU_PLAN)
    rec = Recorder(args.json)
    rec.data["plan"] = {"cpu_smoke": args.cpu_smoke, "budget_s": args.budget_s, **{k: v for k, v in vars(plan).items()}}
    run = {"env": section_env, "scan": section_scan, "model": section_model, "dino": section_dino}
    for name in args.sections:
        guard = Guard(plan.section_s[name], deadline)
        if not guard.fits():
            rec.add(name, {"status": "skipped (run budget spent)"})
            continue
        t0 = time.perf_counter()
        try:
            run[name](plan, rec, guard)
        except Exception as exc:  # a broken section must not cost the others
            rec.add(name, {"status": f"section failed: {type(exc).__name__}: {exc}"})
            _free(plan.device)
        rec.add(name, {"section_s": time.perf_counter() - t0})
    rec.data["total_s"] = time.perf_counter() - start
    rec.add("env", {"total_s": rec.data["total_s"], "json": str(args.json)})


if __name__ == "__main__":
    main()
