"""Shared pieces of the benchmark scripts: memory probes, the device-stamped header, table output."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import resource
import statistics
import time
from datetime import date
from pathlib import Path

import torch


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def vm_hwm_mb() -> float:
    """Peak resident set of this process in MiB (VmHWM; unlike ru_maxrss it is not inherited over exec)."""
    v = _status_mb("VmHWM")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_anon_mb() -> float:
    """Anonymous resident memory of this process in MiB (NaN where /proc is missing)."""
    v = _status_mb("RssAnon")
    return v if v is not None else float("nan")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(name: str, device: str) -> str:
    """``# name — date — device: ... — versions``: the first line of every results table.

    Versions of torch, triton and diffusers ("not installed" where missing: a GPU machine may lack diffusers).
    """
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    return (f"# {name} — {date.today()} — device: {device} ({dev}, {os.cpu_count()} CPU cores) — "
            f"torch {torch.__version__}, triton {_version('triton')}, diffusers {_version('diffusers')}")


#: bf16 dense tensor-core peak by device-name substring (datasheets), TFLOP/s.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def default_peak(device: str) -> float | None:
    """The bf16 dense peak of the current CUDA device from :data:`PEAK_TFLOPS`, or None."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def time_ms(fn, device: str, *, rep_ms: float = 100.0, min_reps: int = 5, cpu_reps: int = 5) -> float:
    """Median milliseconds of ``fn()``.

    CUDA: one warm-up call (compilation, autotuning), a one-call estimate, then
    ``triton.testing.do_bench`` (its own warm-up, L2 flushed before every run, median) over
    ``rep_ms`` or at least ``min_reps`` runs.
    CPU: one warm-up call, then the median of ``cpu_reps`` ``time.perf_counter`` timings.
    """
    if device.startswith("cuda"):
        import triton.testing

        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = (time.perf_counter() - t0) * 1e3
        return float(triton.testing.do_bench(fn, warmup=25, rep=max(rep_ms, min_reps * est), return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def emit(lines: list[str], out: str | None) -> None:
    """Print the table and, with ``out``, write it there too."""
    table = "\n".join(lines)
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table + "\n")


def settle_device_args(ap, a, what: str = "the real shapes") -> None:
    """Shared handling of ``--quick`` (forces the CPU), ``--interpret`` (Triton in the CPU interpreter: sets
    ``TRITON_INTERPRET`` before any kernel module is imported) and ``--device`` for the kernel benchmarks."""
    if a.quick:
        a.device = "cpu"
    if a.interpret:
        if a.device != "cpu":
            ap.error("--interpret runs Triton on the CPU: use it with --quick or --device cpu")
        os.environ["TRITON_INTERPRET"] = "1"
    if not a.device.startswith("cuda") and not a.quick:
        ap.error(f"{what} need CUDA; use --quick on the CPU")


def psnr_uint8(a, b) -> float:
    """PSNR in dB of two uint8 arrays of one shape (e.g. videos ``[F, H, W, 3]``): ``10·log10(255² / MSE)``
    over every element, ``inf`` when they are identical. Summed frame by frame in float64 (no big temporary)."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr_uint8: shapes differ: {a.shape} vs {b.shape}")
    per_frame = a.size // a.shape[0] if a.ndim and a.shape[0] else a.size
    sq = 0.0
    for x, y in zip(a.reshape(-1, max(1, per_frame)), b.reshape(-1, max(1, per_frame))):
        d = x.astype(np.float64) - y.astype(np.float64)
        sq += float(np.dot(d, d))
    mse = sq / max(1, a.size)
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
