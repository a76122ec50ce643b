"""The README's first command, cold: ``wanrt generate --model tiny --prompt "a red circle moves left"`` in a fresh
process each time (interpreter start, imports, loading the packaged trained model, text encoding, 4 UniPC steps with
CFG, VAE decode, MP4 write), on this machine's CPU.

    python benchmarks/bench_cli_cold.py [--runs 5] [--out benchmarks/results/cli_cold_cpu.md]

Prints one row per run (wall seconds of the process, and the stage times the CLI reports) and the median.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

COMMAND = ["generate", "--model", "tiny", "--prompt", "a red circle moves left", "--seed", "0"]
_TIMINGS = re.compile(r"text_encoder ([\d.]+) s, denoise ([\d.]+) s, vae_decode ([\d.]+) s, total ([\d.]+) s")


def run_once(out: Path) -> dict:
    """One cold process; returns its wall seconds and the stage seconds the CLI printed."""
    exe = shutil.which("wanrt")
    cmd = [exe] if exe else [sys.executable, "-m", "wanrt"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + COMMAND + ["-o", str(out)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    m = _TIMINGS.search(proc.stdout + proc.stderr)
    stages = [float(v) for v in m.groups()] if m else [float("nan")] * 4
    return {"wall": wall, "text": stages[0], "denoise": stages[1], "decode": stages[2], "generate": stages[3]}


def main() -> int:
    from common import emit, header

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_once(Path(tmp) / f"run{i}.mp4") for i in range(a.runs)]
    lines = [header("cli_cold", "cpu"), "",
             f"`wanrt {' '.join(COMMAND[:4])} \"{COMMAND[4]}\" --seed 0 -o x.mp4` in a fresh process per run "
             "(the packaged trained tiny model; the preset's defaults: 64x96, 9 frames, 4 UniPC steps, CFG 5). "
             "Wall: the whole process; the stages are the CLI's own report of `generate()`.", "",
             "| run | wall s | text encoder s | denoise s | VAE decode s | generate() s |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i + 1} | {r['wall']:.2f} | {r['text']:.2f} | {r['denoise']:.2f} | {r['decode']:.2f} | "
                     f"{r['generate']:.2f} |")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    lines.append(f"| median | {med['wall']:.2f} | {med['text']:.2f} | {med['denoise']:.2f} | {med['decode']:.2f} | "
                 f"{med['generate']:.2f} |")
    emit(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
