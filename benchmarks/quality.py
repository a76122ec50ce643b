"""The quality gate: does every path that can change the output still make the video the prompt asks for?

Each row generates the held-out prompts of :func:`wanrt.demo.data.held_out_captions` (one object each; seeds the
training data never used) with the project's trained ``tiny`` model and scores the frames with the model-independent
prompt-adherence score of :mod:`wanrt.demo.adherence` (the dominant object's colour and motion against the caption).
Beside adherence: PSNR and SSIM of the uint8 frames against the reference row (mean over prompts; identical frames
count as 100 dB), the skipped DiT steps per CFG branch (TeaCache) and the seconds per video.

Rows: the reference (eager kernels, two CFG passes, float32); every attention backend this device has (the Triton
kernels only with --triton: in the CPU interpreter they take minutes a video); batched CFG; bf16; TeaCache at three
thresholds; fp8, int8 and int8-wo weights; few-step sampling (UniPC at 8 and 4 steps: no distilled tiny model
exists, so this is plain UniPC with fewer steps); tiled and streamed VAE decode (the reference's latents decoded
another way); the parallel layouts (Ulysses 2, Ring 2, CFG 2) on spawned gloo process groups. There is no LoRA for
the tiny model, so no LoRA row.

:data:`FLOORS` are the documented floors each row must keep; ``tests/test_quality.py`` checks them on a smaller
gate in CI (:data:`CI_GATE`) and this script prints them next to the measured values.

    python benchmarks/quality.py                                 # the full gate: 64 prompts, UniPC 50 steps, CFG 5
    python benchmarks/quality.py --out benchmarks/results/quality_cpu.md
    python benchmarks/quality.py --prompts 16 --steps 20 --rows reference teacache-0.10
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import queue
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The gate of the issue: 64 held-out prompts, the official sampler (UniPC, 50 steps, CFG 5).
FULL_GATE = {"prompts": 64, "steps": 50, "guidance": 5.0}
#: The smaller gate ``tests/test_quality.py`` runs in CI, and the reference's adherence floor there.
CI_GATE = {"prompts": 16, "steps": 30, "guidance": 5.0}
CI_MIN_ADHERENCE = 0.8125  # measured 0.875 (14 of 16); one prompt of slack
#: The adherence the issue asked of the reference row on the full gate; reported beside the measured value.
TARGET_ADHERENCE = 0.90
#: TeaCache thresholds of the gate, and the coefficients it passes (mode "e"): the trained tiny model's own, fitted
#: by ``Engine.calibrate_teacache`` pooled over 8 training captions (seeds 100..107, UniPC 50 steps, CFG 5, 64x64x9,
#: float32; 784 step pairs). The ``tiny`` preset has no default coefficients (its random fixtures share the name).
TEACACHE_THRESHOLDS = (0.05, 0.10, 0.20)
TEACACHE_COEFFICIENTS = (-4015.63, 1129.06, -96.8357, 3.93101, -0.0200545)


@dataclasses.dataclass(frozen=True)
class Row:
    """One path through generation: Engine options, generate() options, or a decode of the reference latents."""

    name: str
    engine: dict = dataclasses.field(default_factory=dict)
    generate: dict = dataclasses.field(default_factory=dict)
    decode: str | None = None  # "tiled" or "stream": re-decode the reference's latents
    parallel: dict | None = None  # a wanrt.ParallelConfig's fields: run on spawned gloo ranks
    needs: str | None = None  # "triton": only on a GPU, or with --triton (the CPU interpreter)


def rows(device: str) -> list[Row]:
    """Every row of the gate for ``device``, reference first."""
    out = [
        Row("reference", {"backend": "eager", "cfg_batch": False}),
        Row("sdpa", {"backend": "sdpa", "cfg_batch": False}),
        Row("triton", {"backend": "triton", "cfg_batch": False}, needs="triton"),
        Row("cfg-batch", {"backend": "eager", "cfg_batch": True}),
        Row("bf16", {"backend": "eager", "cfg_batch": False, "precision": "bf16"}),
    ]
    out += [Row(f"teacache-{t:.2f}", {"backend": "eager", "cfg_batch": False}, {"teacache_threshold": t})
            for t in TEACACHE_THRESHOLDS]
    out += [Row(p, {"backend": "eager", "cfg_batch": False, "precision": p}) for p in ("fp8", "int8", "int8-wo")]
    out += [
        Row("unipc-8-steps", {"backend": "eager", "cfg_batch": False}, {"num_inference_steps": 8}),
        Row("unipc-4-steps", {"backend": "eager", "cfg_batch": False}, {"num_inference_steps": 4}),
        Row("tiled-decode", decode="tiled"),
        Row("streamed-decode", decode="stream"),
        Row("ulysses-2", {"backend": "eager"}, parallel={"ulysses": 2}),
        Row("ring-2", {"backend": "eager"}, parallel={"ring": 2}),
        Row("cfg-parallel-2", {"backend": "eager"}, parallel={"cfg": 2}),
    ]
    return out


#: Documented floors per row: ``adherence`` is the most the row's adherence may fall below the reference's
#: (fraction; never less than one prompt's share, ``1 / prompts``, so that a 16-prompt gate is not failed by one
#: prompt of a near-exact path), ``psnr`` the least mean PSNR (dB) against the reference's frames;
#: ``min_adherence`` (reference only) the absolute floor the trained model keeps today (the issue's target,
#: :data:`TARGET_ADHERENCE`, is reported beside it). Rows without an entry are reported only.
FLOORS: dict[str, dict[str, float]] = {
    "reference": {"min_adherence": 0.89},  # measured 0.906 (58 of 64); one prompt of slack
    "sdpa": {"adherence": 0.0, "psnr": 40.0},
    "triton": {"adherence": 0.0, "psnr": 40.0},
    "cfg-batch": {"adherence": 0.0, "psnr": 40.0},
    "bf16": {"adherence": 0.05, "psnr": 20.0},
    "teacache-0.05": {"adherence": 0.05, "psnr": 22.0},
    "teacache-0.10": {"adherence": 0.05, "psnr": 20.0},  # the recommended threshold
    "teacache-0.20": {"adherence": 0.15},
    "fp8": {"adherence": 0.10, "psnr": 15.0},
    "int8": {"adherence": 0.05, "psnr": 20.0},
    "int8-wo": {"adherence": 0.05, "psnr": 20.0},
    "unipc-8-steps": {"adherence": 0.15},
    "tiled-decode": {"adherence": 0.05, "psnr": 25.0},
    "streamed-decode": {"adherence": 0.0, "psnr": 60.0},
    "ulysses-2": {"adherence": 0.0, "psnr": 40.0},
    "ring-2": {"adherence": 0.0, "psnr": 40.0},
    "cfg-parallel-2": {"adherence": 0.0, "psnr": 40.0},
}


def ssim_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 videos ``[F, H, W, 3]`` on luma, 7x7 uniform windows (Wang et al. 2004, with the
    usual ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``)."""
    import torch
    import torch.nn.functional as F

    def luma(v):
        t = torch.from_numpy(v.astype(np.float32))
        return (0.299 * t[..., 0] + 0.587 * t[..., 1] + 0.114 * t[..., 2])[:, None]  # [F, 1, H, W]

    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def mean(t):
        return F.avg_pool2d(t, 7, stride=1)

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 videos; 100 for identical ones."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _engine(row: Row, checkpoint, device: str, **extra):
    import wanrt

    kw = {"device": device, "precision": "fp32", "prompt_cache_size": 0, **row.engine, **extra}
    return wanrt.Engine("tiny", checkpoint, **kw)


def _gen_kwargs(gate: dict, row: Row, k: int) -> dict:
    kw = {"num_inference_steps": gate["steps"], "guidance_scale": gate["guidance"], "sample_solver": "unipc",
          "seed": 1000 + k, "height": 64, "width": 64, "num_frames": 9, "progress": False}
    kw.update(row.generate)
    if "teacache_threshold" in kw:
        kw["teacache_coefficients"] = TEACACHE_COEFFICIENTS
    return kw


def _generate_all(engine, prompts, gate, row) -> tuple[list, list, list, float]:
    frames, latents, skipped = [], [], []
    t0 = time.perf_counter()
    for k, p in enumerate(prompts):
        v = engine.generate(p, **_gen_kwargs(gate, row, k))
        frames.append(v.frames)
        latents.append(v.latents)
        tc = (v.stats or {}).get("teacache")
        skipped.append(tc["cond"]["skipped"] if tc else None)
    return frames, latents, skipped, (time.perf_counter() - t0) / max(1, len(prompts))


def _parallel_body(rank, world, row, checkpoint, prompts, gate, results):
    import torch

    import wanrt
    from wanrt.parallel import init

    torch.set_num_threads(1)
    init(timeout_s=120.0, backend="gloo")
    engine = _engine(row, checkpoint, "cpu", parallel=wanrt.ParallelConfig(**row.parallel))
    frames, _, _, sec = _generate_all(engine, prompts, gate, row)
    if rank == 0:
        results.put((frames, sec))


def _spawn_entry(rank, world, port, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        _parallel_body(rank, world, *args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _run_parallel(row, checkpoint, prompts, gate):
    import socket

    import torch.multiprocessing as mp

    world = math.prod(row.parallel.values())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_spawn_entry, args=(r, world, port, row, checkpoint, prompts, gate, results))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 1800
    try:
        while True:  # a rank that dies (e.g. cannot import this module) fails the row at once, not at the deadline
            try:
                frames, sec = results.get(timeout=1.0)
                break
            except queue.Empty:
                codes = [p.exitcode for p in procs]
                if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
                    raise RuntimeError(f"row {row.name}: the ranks exited with {codes} before a result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"row {row.name}: no result in 1800 s") from None
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"row {row.name}: a rank exited with {[p.exitcode for p in procs]}")
    return frames, sec


def run_gate(names=None, *, prompts: int, steps: int, guidance: float, device: str = "cpu", checkpoint=None,
             triton: bool = False, on_row=None) -> list[dict]:
    """Run the rows called ``names`` (all the device has, by default; the reference always runs first) and return
    one dict per row: ``name, adherence, psnr, ssim, skipped, seconds`` (psnr/ssim None for the reference)."""
    import torch

    from wanrt.demo.adherence import adheres
    from wanrt.demo.data import held_out_captions
    from wanrt.models.vae_tiling import TilingConfig, decode_tiled
    from wanrt.video import to_uint8_frames

    gate = {"prompts": prompts, "steps": steps, "guidance": guidance}
    held = held_out_captions(prompts)
    captions, specs = [c for c, _ in held], [s for _, s in held]
    chosen = [r for r in rows(device) if names is None or r.name in names or r.name == "reference"]
    chosen = [r for r in chosen if not (r.needs == "triton" and not (triton or device.startswith("cuda")))]
    out, ref = [], None
    for row in chosen:
        skipped = [None] * prompts
        if row.decode is not None:  # the reference's engine decodes its latents another way
            engine = ref["engine"]
            t0 = time.perf_counter()
            frames = []
            for lat in ref["latents"]:
                if row.decode == "tiled":
                    video = decode_tiled(engine.vae, lat, TilingConfig(tile_latent=6, overlap_latent=2))
                else:
                    video = torch.cat(list(engine.decode_stream(lat)), dim=2)
                frames.append(to_uint8_frames(video))
            sec = (time.perf_counter() - t0) / prompts
        elif row.parallel is not None:
            frames, sec = _run_parallel(row, checkpoint, captions, gate)
        else:
            try:
                engine = _engine(row, checkpoint, device)
            except (ValueError, RuntimeError, ImportError) as e:
                out.append({"name": row.name, "error": str(e).splitlines()[0][:120]})
                continue
            frames, latents, skipped, sec = _generate_all(engine, captions, gate, row)
            if row.name == "reference":
                ref = {"frames": frames, "latents": latents, "engine": engine}
        r = {"name": row.name, "adherence": sum(adheres(f, s) for f, s in zip(frames, specs, strict=True)) / prompts,
             "seconds": sec, "skipped": skipped, "psnr": None, "ssim": None}
        if row.name == "reference":
            r["frames"], r["specs"] = frames, specs  # kept for callers (tests score them against other prompts)
        else:
            r["psnr"] = float(np.mean([psnr(a, b) for a, b in zip(frames, ref["frames"], strict=True)]))
            r["ssim"] = float(np.mean([ssim_uint8(a, b) for a, b in zip(frames, ref["frames"], strict=True)]))
        out.append(r)
        if on_row is not None:
            on_row(r)
    return out


def check_floors(results: list[dict], min_adherence: float | None = None) -> list[str]:
    """The floor violations of ``results`` (empty when every row keeps its documented floor); ``min_adherence``
    replaces the reference's absolute floor (the CI gate's :data:`CI_MIN_ADHERENCE`: fewer prompts and steps)."""
    ref = next(r for r in results if r["name"] == "reference")
    one_prompt = 1.0 / len(ref["specs"]) if ref.get("specs") else 0.0
    bad = []
    for r in results:
        floor = FLOORS.get(r["name"], {})
        if min_adherence is not None and "min_adherence" in floor:
            floor = {**floor, "min_adherence": min_adherence}
        if "error" in r:
            continue
        if "min_adherence" in floor and r["adherence"] < floor["min_adherence"]:
            bad.append(f"{r['name']}: adherence {r['adherence']:.3f} < {floor['min_adherence']:g}")
        allowed = max(floor.get("adherence", 0.0), one_prompt)
        if "adherence" in floor and r["adherence"] < ref["adherence"] - allowed - 1e-9:
            bad.append(f"{r['name']}: adherence {r['adherence']:.3f} more than {allowed:.3f} below the "
                       f"reference's {ref['adherence']:.3f}")
        if "psnr" in floor and r["psnr"] is not None and r["psnr"] < floor["psnr"]:
            bad.append(f"{r['name']}: PSNR {r['psnr']:.1f} dB < {floor['psnr']:.1f}")
    return bad


def _skipped_words(skipped) -> str:
    vals = [s for s in skipped if s is not None]
    if not vals:
        return ""
    return f"{np.mean(vals):.1f}"


def _floor_words(name: str) -> str:
    f = FLOORS.get(name)
    if not f:
        return "reported"
    parts = []
    if "min_adherence" in f:
        parts.append(f"adherence >= {f['min_adherence']:g}")
    if "adherence" in f:
        parts.append(f"adherence >= ref - {f['adherence']:.2f}")
    if "psnr" in f:
        parts.append(f"PSNR >= {f['psnr']:.0f}")
    return ", ".join(parts)


def table(results: list[dict], gate: dict) -> list[str]:
    lines = [
        f"The trained `tiny` model, {gate['prompts']} held-out prompts (one object each), 64x64, 9 frames, UniPC "
        f"{gate['steps']} steps, CFG {gate['guidance']}; PSNR/SSIM of the uint8 frames against the reference row's "
        "(mean over prompts; identical = 100 dB). Skipped: DiT steps TeaCache skipped per CFG branch (mean).",
        "",
        "| row | adherence | PSNR dB | SSIM | skipped steps | s / video | floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | not run: {r['error']} | | | | | {_floor_words(r['name'])} |")
            continue
        p = "" if r["psnr"] is None else f"{r['psnr']:.1f}"
        s = "" if r["ssim"] is None else f"{r['ssim']:.4f}"
        lines.append(f"| {r['name']} | {r['adherence']:.3f} | {p} | {s} | {_skipped_words(r['skipped'])} | "
                     f"{r['seconds']:.2f} | {_floor_words(r['name'])} |")
    bad = check_floors(results)
    ref = next((r for r in results if r["name"] == "reference" and "error" not in r), None)
    if ref is not None:
        lines += ["", f"Reference adherence {ref['adherence']:.3f} against the target of {TARGET_ADHERENCE:.2f}: "
                  + ("reached." if ref["adherence"] >= TARGET_ADHERENCE else "not reached yet.")]
    lines += ["", "Floors (an adherence floor is at least one prompt's share, "
              f"{1 / gate['prompts']:.3f} here): " + ("all kept." if not bad else "BROKEN: " + "; ".join(bad))]
    return lines


def main() -> int:
    from common import emit, header

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=FULL_GATE["prompts"])
    ap.add_argument("--steps", type=int, default=FULL_GATE["steps"])
    ap.add_argument("--guidance", type=float, default=FULL_GATE["guidance"])
    ap.add_argument("--rows", nargs="*", default=None, help="row names (default: every row this device has)")
    ap.add_argument("--checkpoint", default=None, help="a tiny checkpoint folder (default: the shipped model)")
    ap.add_argument("--triton", action="store_true", help="also the Triton row on the CPU (the interpreter: slow)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    gate = {"prompts": a.prompts, "steps": a.steps, "guidance": a.guidance}
    lines = [header("quality", a.device), ""]

    def progress(r):
        print(r["name"], {k: v for k, v in r.items() if k not in ("name", "skipped", "frames", "specs")},
              file=sys.stderr, flush=True)

    results = run_gate(a.rows, device=a.device, checkpoint=a.checkpoint, triton=a.triton, on_row=progress, **gate)
    emit(lines + table(results, gate), a.out)
    return 1 if check_floors(results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
