"""Benchmark: selective-scan backends vs a naive token loop on CPU (not a test).

    python bench/ssm_scan.py                 # both model shapes, every backend, a table
    python bench/ssm_scan.py --json out.json # also write the rows

Each (implementation, shape) runs once, in its own subprocess, so that peak
memory is that process's ru_maxrss growth over the run (inputs allocated and
kernels warmed up before the baseline is taken). Shapes: the two that dominate
pixel_mamba_6m — L = 50,177 at d_inner 6 (one 224 region at pixel level) and
L = 6,272 at d_inner 384 (eight regions at 8×8-pixel tokens) — d_state 16,
batch 1, delta_softplus with bias, D and z, as the Mamba block calls it.
A state update is one (token, channel, state) step: L·d_inner·d_state of them.

``triton`` runs where CUDA is available, on CUDA tensors (times synchronised, peak memory
from torch.cuda.max_memory_allocated instead of RSS); elsewhere its rows say "needs CUDA".
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

SHAPES = ((50_177, 6), (6_272, 384))
D_STATE = 16
IMPLS = ("naive", "torch", "numba", "triton")
GPU_IMPLS = ("triton",)


@dataclass(frozen=True, kw_only=True)
class Row:
    impl: str
    L: int
    d_inner: int
    d_state: int
    fwd_s: float
    fwdbwd_s: float | None
    fwd_cpu_s: float
    fwdbwd_cpu_s: float | None
    first_call_s: float
    peak_fwd_mib: float
    peak_fwdbwd_mib: float | None
    threads: int


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _inputs(L: int, d: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return dict(
        u=torch.randn(1, d, L, generator=g),
        delta=torch.randn(1, d, L, generator=g) - 2.0,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        B=torch.randn(1, n, L, generator=g),
        C=torch.randn(1, n, L, generator=g),
        D=torch.ones(d),
        z=torch.randn(1, d, L, generator=g),
        delta_bias=torch.randn(d, generator=g) * 0.1,
    )


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """The obvious implementation: a Python loop over tokens, torch ops per token."""
    import torch
    import torch.nn.functional as F

    dt = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        dtt = dt[:, :, t, None]
        h = torch.exp(dtt * A) * h + dtt * u[:, :, t, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + D[:, None] * u
    return y * F.silu(z)


def worker(impl: str, L: int, d: int) -> Row:
    import torch

    from trainer.models.ssm import selective_scan_fn

    cuda = impl in GPU_IMPLS

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak_mib() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else _maxrss_mib()

    def inputs(L_: int):
        x_ = _inputs(L_, d, D_STATE)
        return {k: v.cuda() for k, v in x_.items()} if cuda else x_

    def call(x):
        if impl == "naive":
            return naive_scan(**x)
        return selective_scan_fn(**x, delta_softplus=True, backend=impl)

    t0 = time.perf_counter()
    with torch.no_grad():
        call(inputs(min(L, 64)))  # numba: compile or load its cache; triton: compile
    if impl != "naive":
        small = {k: v.requires_grad_(True) for k, v in inputs(min(L, 64)).items()}
        call(small).sum().backward()
    sync()
    first_call = time.perf_counter() - t0

    x = inputs(L)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = peak_mib()
    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        call(x)
        sync()
        fwd, fwd_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_fwd = peak_mib() - base
    fwdbwd = peak_fwdbwd = fwdbwd_cpu = None
    if impl != "naive":
        leaves = {k: v.requires_grad_(True) for k, v in x.items()}
        t0, c0 = time.perf_counter(), time.process_time()
        call(leaves).sum().backward()
        sync()
        fwdbwd, fwdbwd_cpu = time.perf_counter() - t0, time.process_time() - c0
        peak_fwdbwd = peak_mib() - base
    return Row(impl=impl, L=L, d_inner=d, d_state=D_STATE, fwd_s=fwd, fwdbwd_s=fwdbwd,
               fwd_cpu_s=fwd_cpu, fwdbwd_cpu_s=fwdbwd_cpu, first_call_s=first_call,
               peak_fwd_mib=peak_fwd, peak_fwdbwd_mib=peak_fwdbwd, threads=torch.get_num_threads())


def table(rows: list[Row], needs_cuda: list[tuple[str, int, int]] = ()) -> str:
    naive = {(r.L, r.d_inner): r.fwd_s for r in rows if r.impl == "naive"}
    head = ("| L | d_inner | backend | fwd CPU s | fwd+bwd CPU s | fwd s | fwd tok/s | fwd Gupd/s | ×naive fwd | fwd+bwd s | fwd+bwd tok/s "
            "| fwd+bwd Gupd/s | fwd+bwd / naive fwd | peak ΔRSS fwd MiB | peak ΔRSS fwd+bwd MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        upd = r.L * r.d_inner * r.d_state
        ref = naive.get((r.L, r.d_inner))
        fb = r.fwdbwd_s
        lines.append(
            f"| {r.L:,} | {r.d_inner} | {r.impl} | {r.fwd_cpu_s:.3f} | "
            + (f"{r.fwdbwd_cpu_s:.3f}" if r.fwdbwd_cpu_s is not None else "–")
            + f" | {r.fwd_s:.3f} | {r.L / r.fwd_s:,.0f} | {upd / r.fwd_s / 1e9:.3f} | "
            f"{(ref / r.fwd_s) if ref else float('nan'):.1f} | "
            + (f"{fb:.3f} | {r.L / fb:,.0f} | {upd / fb / 1e9:.3f} | {(fb / ref) if ref else float('nan'):.2f} | " if fb else "– | – | – | – | ")
            + f"{r.peak_fwd_mib:.1f} | " + (f"{r.peak_fwdbwd_mib:.1f} |" if r.peak_fwdbwd_mib is not None else "– |")
        )
    for impl, L, d in needs_cuda:
        lines.append(f"| {L:,} | {d} | {impl} | needs CUDA |" + " – |" * (head.count("|") - 5))
    return "\n".join(lines)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to run")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="torch and numba threads per run (0: their defaults)")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "L", "D_INNER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        impl, L, d = args.worker
        if args.threads:
            import numba
            import torch

            torch.set_num_threads(args.threads)
            numba.set_num_threads(args.threads)
        print(json.dumps(asdict(worker(impl, int(L), int(d)))))
        return
    rows, needs_cuda = [], []
    cuda = _cuda_available() if any(i in GPU_IMPLS for i in args.impl) else False
    for L, d in SHAPES:
        for impl in args.impl:
            if impl in GPU_IMPLS and not cuda:
                needs_cuda.append((impl, L, d))
                continue
            cmd = [sys.executable, __file__, "--worker", impl, str(L), str(d), "--threads", str(args.threads)]
            out = subprocess.run(cmd,
                                 check=True, capture_output=True, text=True)
            rows.append(Row(**json.loads(out.stdout.strip().splitlines()[-1])))
            print(f"done: {impl} L={L} d_inner={d}: fwd {rows[-1].fwd_s:.3f} s", file=sys.stderr, flush=True)
    print(table(rows, needs_cuda))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
