"""Shared pieces of the benchmark scripts: memory probes, the device-stamped header, table output."""

from __future__ import annotations

import os
import platform
import resource
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


def header(name: str, device: str) -> str:
    """``# name — date — device: ... — versions``: the first line of every results table."""
    import diffusers

    dev = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    return (f"# {name} — {date.today()} — device: {device} ({dev}, {os.cpu_count()} CPU cores) — "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}")


def emit(lines: list[str], out: str | None) -> None:
    """Print the table and, with ``out``, write it there too."""
    table = "\n".join(lines)
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table + "\n")
