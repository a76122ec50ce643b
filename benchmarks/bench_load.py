"""Checkpoint loading benchmark: seconds and peak host memory to load the DiT, wanrt vs diffusers.

Writes a random t2v-1.3b checkpoint (fp32, 5.7 GB, like the official release) in both layouts, then
loads the DiT in a fresh subprocess per run with each library, into --dtype on --device. Peak host
memory is given twice: the peak of anonymous memory (sampled every 5 ms; what the process really
owns) and the peak resident set, which also counts the clean, reclaimable file pages safetensors maps.
CUDA peak is max_memory_allocated.

    python benchmarks/bench_load.py --out benchmarks/results/load_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import emit, header, rss_anon_mb, vm_hwm_mb

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}




def _worker(kind: str, ckpt: str, device: str, dtype: str) -> dict:
    import threading

    base = vm_hwm_mb()
    peak_anon = [rss_anon_mb()]
    done = threading.Event()

    def sample() -> None:  # anonymous memory has no kernel high-water mark: sample it
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], rss_anon_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if kind == "wanrt":
        import wanrt

        model = wanrt.load_transformer(ckpt, device=device, dtype=DTYPES[dtype])
    else:
        import diffusers

        model = diffusers.WanTransformer3DModel.from_pretrained(
            os.path.join(ckpt, "transformer"), torch_dtype=DTYPES[dtype]).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    done.set()
    sampler.join()
    n = sum(p.numel() for p in model.parameters())
    return {"seconds": secs, "peak_rss_mb": vm_hwm_mb(),
            "base_rss_mb": base, "peak_anon_mb": peak_anon[0], "params": n,
            "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--preset", default="t2v-1.3b")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_worker", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        print(json.dumps(_worker(a._worker[0], a._worker[1], a.device, a.dtype)))
        return

    from wanrt.checkpoints.tiny import write_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("WANRT_BENCH_TMP")) as tmp:
        for layout in ("official", "diffusers"):
            t0 = time.perf_counter()
            ck = write_checkpoint(Path(tmp) / layout, layout=layout, preset=a.preset)
            print(f"wrote {layout} checkpoint in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for kind in (("wanrt",) if layout == "official" else ("wanrt", "diffusers")):
                # drop nothing from the page cache: both read warm files, the fair case for a service
                out = subprocess.run([sys.executable, __file__, "--device", a.device, "--dtype", a.dtype,
                                      "--_worker", kind, str(ck)], capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((kind, layout, r))
    lines = [header("bench_load", a.device), "",
             f"DiT of a random `{a.preset}` checkpoint stored in fp32 (as released), loaded into {a.dtype} on "
             f"{a.device}; one fresh process per row, files in the page cache.", "",
             "| library | layout | seconds | weights MiB | peak anonymous MiB | peak RSS MiB (incl. mapped file) "
             "| RSS at start MiB | CUDA peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, layout, r in rows:
        lines.append(f"| {kind} | {layout} | {r['seconds']:.2f} | {r['weights_mb']:.0f} | {r['peak_anon_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | "
                     f"{r['base_rss_mb']:.0f} | {r['cuda_peak_mb']:.0f} |")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
