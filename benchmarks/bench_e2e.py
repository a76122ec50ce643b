"""End-to-end benchmark: wanrt's denoising-loop options, and wanrt eager against diffusers' WanPipeline.

Three parts (``--parts``, default all), each printed (and with --out written) as a markdown table:

* ``loop``: one row per Engine/generate configuration, same seed and prompt: the reference loop (two CFG
  passes, no CUDA graphs, no TeaCache), + batched CFG, + CUDA graphs (CUDA only), + TeaCache at a few
  thresholds. Seconds per denoising step and per video, peak memory, TeaCache's skipped steps per CFG
  branch, and the PSNR of the decoded uint8 video against the reference row's.
* ``pipelines``: per-stage seconds (text encoder, denoising, VAE decode) and peak memory of wanrt and
  diffusers' WanPipeline on the same weights and settings (needs diffusers; skipped with a note without).
* ``dit``: a DiT forward at the real t2v-1.3b dimensions, wanrt vs diffusers (needs diffusers too).

Each run happens in its own subprocess so that peak memory is its own (CUDA: max_memory_allocated;
CPU: the process's peak resident set). Timings are medians over --repeats runs after a warm-up run.

    python benchmarks/bench_e2e.py                       # CPU: tiny model, 64x96, 9 frames, 10 steps
    python benchmarks/bench_e2e.py --parts loop --out benchmarks/results/e2e_loop_cpu_tiny.md
    python benchmarks/bench_e2e.py --parts pipelines dit --steps 4   # as benchmarks/results/e2e_cpu.md
    python benchmarks/bench_e2e.py --device cuda --parts loop --preset t2v-1.3b --height 480 --width 832 \
        --frames 81 --steps 50 --repeats 1 --teacache-thresholds 0.08   # ~5-6 min on an H100 (gpu_suite.sh)
    python benchmarks/bench_e2e.py --preset tiny-i2v --parts pipelines   # image-to-video vs WanImageToVideoPipeline
    python benchmarks/bench_e2e.py --preset tiny-vace --parts pipelines  # VACE inpainting vs WanVACEPipeline
    python benchmarks/bench_e2e.py --preset tiny-ti2v --height 64 --width 96 --parts pipelines [--ti2v-image]

Image presets (tiny-i2v, tiny-flf2v, i2v-14b-*, flf2v-14b-720p) condition every run on a fixed random image of
exactly --height x --width (and a second one as the last frame for flf2v), with wanrt's conditioning cache off,
so every run encodes its image(s) as diffusers does. VACE presets (tiny-vace, vace-1.3b, vace-14b) run an
inpainting request: a fixed random source video of exactly that size, a mask generating its central half, and one
reference image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit, header, psnr_uint8, vm_hwm_mb


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mb(dev: str) -> float:
    if dev.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return vm_hwm_mb()


def _timed(dev, fn):
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def _task(a) -> str:
    from wanrt.presets import get_preset

    return get_preset(a.preset).task


def _images(a) -> dict:
    """The conditioning images of an image preset (uint8 ``[H, W, 3]`` of exactly the video size), the inputs of a
    VACE one (a source video, its mask, a reference image), else {}."""
    task = _task(a)
    if task == "t2v" or (task == "ti2v" and not a.ti2v_image):
        return {}
    rng = np.random.default_rng(0)
    if task == "ti2v":  # TI2V image-to-video: the image of exactly the video size, encoded as the first latent frame
        return {"image": rng.integers(0, 256, (a.height, a.width, 3), dtype=np.uint8)}
    if task == "vace":
        mask = np.zeros((a.frames, a.height, a.width), np.uint8)
        mask[:, a.height // 4:3 * a.height // 4, a.width // 4:3 * a.width // 4] = 255
        return {"video": rng.integers(0, 256, (a.frames, a.height, a.width, 3), dtype=np.uint8), "mask": mask,
                "reference_images": [rng.integers(0, 256, (a.height, a.width, 3), dtype=np.uint8)]}
    first = rng.integers(0, 256, (a.height, a.width, 3), dtype=np.uint8)
    last = rng.integers(0, 256, (a.height, a.width, 3), dtype=np.uint8) if task == "flf2v" else None
    return {"image": first, "last_image": last}


def worker_wanrt(a) -> dict:
    import wanrt

    # prompt and image caches off: the encoders run every time, as in diffusers' pipelines
    engine = wanrt.Engine.from_pretrained(a.ckpt, device=a.device, precision=a.precision, prompt_cache_size=0,
                                          image_cache_size=0)
    kw = {"height": a.height, "width": a.width, "num_frames": a.frames, "num_inference_steps": a.steps,
          "guidance_scale": a.guidance, "sample_solver": "unipc", "seed": 0, "progress": False} | _images(a)
    runs = []
    for _ in range(a.repeats + 1):
        v = engine.generate(a.prompt, **kw)
        t = dict(v.timings)
        t["denoise"] += t.get("image_encoder", 0.0) + t.get("vae_encode", 0.0)  # diffusers times them together
        runs.append(t)
    runs = runs[1:]
    return {k: statistics.median(r[k] for r in runs) for k in ("text_encoder", "denoise", "vae_decode", "total")} | {
        "peak_mb": _peak_mb(a.device)}


def worker_diffusers(a) -> dict:
    import diffusers

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    images = _images(a)
    vace = _task(a) == "vace"
    cls = diffusers.WanVACEPipeline if vace else diffusers.WanImageToVideoPipeline if images else diffusers.WanPipeline
    pipe = cls.from_pretrained(a.ckpt, dtype=dtype)
    pipe.vae.to(torch.float32)
    pipe.to(a.device)
    pipe.set_progress_bar_config(disable=True)
    if vace:
        from PIL import Image

        images = {"video": [Image.fromarray(f) for f in images["video"]],
                  "mask": [Image.fromarray(m).convert("RGB") for m in images["mask"]],
                  "reference_images": [Image.fromarray(r) for r in images["reference_images"]]}
    elif images:
        from PIL import Image

        images = {k: Image.fromarray(v) for k, v in images.items() if v is not None}
    runs = []
    for _ in range(a.repeats + 1):
        g = torch.Generator("cpu").manual_seed(0)
        (pe, ne), t_text = _timed(a.device, lambda: pipe.encode_prompt(
            a.prompt, None, do_classifier_free_guidance=a.guidance > 1, device=a.device))
        lat, t_den = _timed(a.device, lambda pe=pe, ne=ne, g=g: pipe(
            prompt_embeds=pe, negative_prompt_embeds=ne, height=a.height, width=a.width, num_frames=a.frames,
            num_inference_steps=a.steps, guidance_scale=a.guidance, generator=g, output_type="latent",
            **images).frames)

        if vace:  # with output_type="latent" the pipeline keeps the reference frames; its decode drops them
            lat = lat[:, :, len(images["reference_images"]):]

        def decode(lat=lat):
            mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(lat)
            std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1).to(lat)
            return pipe.vae.decode((lat * std + mean).float(), return_dict=False)[0]

        _, t_dec = _timed(a.device, decode)
        runs.append({"text_encoder": t_text, "denoise": t_den, "vae_decode": t_dec, "total": t_text + t_den + t_dec})
    runs = runs[1:]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"peak_mb": _peak_mb(a.device)}


def worker_dit(a) -> dict:
    """One DiT forward at the real t2v-1.3b dimensions: wanrt's WanDiT vs diffusers' model, same weights."""
    import diffusers

    from wanrt.checkpoints.keymap_dit import dit_from_official
    from wanrt.checkpoints.tiny import dit_config_for, randomize_
    from wanrt.models.dit import WanDiT
    from wanrt.presets import get_preset

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    cfg = dit_config_for(get_preset("t2v-1.3b"))
    ours = randomize_(WanDiT(cfg), 0)
    ref = diffusers.WanTransformer3DModel(**cfg.to_diffusers_config())
    ref.load_state_dict({dit_from_official(k): v for k, v in ours.state_dict().items()}, strict=True)
    for n, p in ours.named_parameters():
        if not WanDiT.keep_fp32(n):
            p.data = p.data.to(dtype)
    ours.to(a.device).eval().requires_grad_(False)
    ref.to(a.device, dtype).eval().requires_grad_(False)
    f, h, w = a.dit_latent
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, f, h, w, generator=g).to(a.device)
    ctx = torch.randn(1, 512, 4096, generator=g).to(a.device)
    t = torch.tensor([500], device=a.device)
    res = {}
    with torch.no_grad():
        for name, fn in (("wanrt", lambda: ours(x, t, ctx)),
                         ("diffusers", lambda: ref(x.to(dtype), t, ctx.to(dtype), return_dict=False)[0])):
            fn()
            times = [_timed(a.device, fn)[1] for _ in range(a.repeats)]
            res[name] = statistics.median(times)
    res["tokens"] = f * (h // 2) * (w // 2)
    return res


#: Loop-options defaults per preset: TeaCache mode, thresholds, coefficients (None: the preset's published
#: polynomial). The tiny random model has none: its time embedding changes by ~1 (relative L1) per step at
#: 10 steps, so ``0.1·rel`` adds ~0.1 per step and a threshold θ skips about 1 - 0.1/θ of the steps.
LOOP_DEFAULTS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...] | None]] = {
    "t2v-1.3b": ("e", (0.05, 0.08, 0.10), None),
    "t2v-14b": ("e0", (0.14, 0.20), None),
    "tiny": ("e", (0.10, 0.20, 0.30), (0.0, 0.0, 0.0, 0.1, 0.0)),
    "tiny-i2v": ("e", (0.10, 0.20, 0.30), (0.0, 0.0, 0.0, 0.1, 0.0)),
    "tiny-flf2v": ("e", (0.10, 0.20, 0.30), (0.0, 0.0, 0.0, 0.1, 0.0)),
    "tiny-vace": ("e", (0.10, 0.20, 0.30), (0.0, 0.0, 0.0, 0.1, 0.0)),
    "i2v-14b-480p": ("e0", (0.13, 0.19, 0.26), None),
    "i2v-14b-720p": ("e0", (0.18, 0.20, 0.30), None),
}


def _graph_totals(video) -> dict[str, int]:
    """``Video.stats["cuda_graphs"]`` counts (cumulative over the engine's life) summed over its wrappers."""
    tot: dict[str, int] = {}
    for wrapper in (video.stats.get("cuda_graphs") or {}).values():
        for k, n in wrapper.items():
            tot[k] = tot.get(k, 0) + n
    return tot


def worker_loop(a) -> dict:
    """One loop-options row: load, warm up (2 steps, same size and options), then --repeats timed videos."""
    import wanrt

    row = json.loads(a._row)
    engine = wanrt.Engine.from_pretrained(
        a.ckpt, device=a.device, precision=a.precision, backend=a.backend, cfg_batch=row["cfg_batch"],
        cuda_graphs=row["cuda_graphs"], compile=a.compile or False, prompt_cache_size=0, image_cache_size=0)
    kw = {"height": a.height, "width": a.width, "num_frames": a.frames, "num_inference_steps": a.steps,
          "guidance_scale": a.guidance, "sample_solver": "unipc", "seed": a.seed, "progress": False,
          "teacache_threshold": row["teacache_threshold"]} | _images(a)
    if row["teacache_threshold"]:
        kw |= {"teacache_mode": a.teacache_mode, "teacache_coefficients": a.teacache_coefficients}
    # Warm-up: kernels compile/autotune, torch.compile traces, this shape's CUDA graphs are captured (with
    # TeaCache both steps of a 2-step video compute, so the residual-returning graph is captured too).
    warm = engine.generate(a.prompt, **(kw | {"num_inference_steps": 2}))
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    graphs_before = _graph_totals(warm)
    videos = []
    for i in range(a.repeats):
        v = engine.generate(a.prompt, **kw)
        if i == 0:
            np.save(a._frames, v.frames)
        videos.append(v)
    graphs = {k: n - graphs_before.get(k, 0) for k, n in _graph_totals(videos[-1]).items()}  # the timed runs
    t = {k: statistics.median(v.timings[k] for v in videos) for k in ("text_encoder", "denoise", "vae_decode", "total")}
    same = all(np.array_equal(videos[0].frames, v.frames) for v in videos[1:])
    return t | {"peak_mb": _peak_mb(a.device), "stats": videos[0].stats, "graphs": graphs, "plan": engine.plan.name,
                "deterministic": same}


def _run_worker(kind: str, a, extra=()) -> dict:
    cmd = [sys.executable, __file__, "--_worker", kind] + [x for x in sys.argv[1:] if x != "--_worker"] + list(extra)
    if a.ckpt:
        cmd += ["--ckpt", a.ckpt]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _diffusers_missing() -> str | None:
    """Why ``import diffusers`` fails here, or None when it works."""
    try:
        import diffusers  # noqa: F401
    except Exception as e:  # noqa: BLE001 (ImportError, or a broken install raising anything)
        return f"{type(e).__name__}: {e}"
    return None


def loop_rows(a) -> list[dict]:
    """The loop-options configurations, each adding its option to the row above (TeaCache rows all build on
    the last non-TeaCache row)."""
    cuda = a.device.startswith("cuda")

    def row(label, cfg_batch, cuda_graphs, teacache_threshold=None, cuda_only=False):
        return {"label": label, "cfg_batch": cfg_batch, "cuda_graphs": cuda_graphs,
                "teacache_threshold": teacache_threshold, "cuda_only": cuda_only}

    rows = [row("reference (cfg_batch=False, cuda_graphs=False)", False, False),
            row("+ batched CFG", True, False),
            row("+ CUDA graphs", True, True, cuda_only=True)]
    rows += [row(f"+ TeaCache {th:g} ({a.teacache_mode})", True, cuda, th) for th in a.teacache_thresholds]
    return rows


def _fmt_mb(mb: float) -> str:
    return f"{mb:,.0f} MiB" if mb < 10240 else f"{mb / 1024:.1f} GiB"


def run_loop(a, tmp: Path, on_row=None) -> list[str]:
    """Run the loop-options rows (one subprocess each) and return the table's lines.

    ``on_row(lines)``, when given, gets the table so far after every row (so that a run cut short by a
    timeout still leaves the rows it finished)."""
    cuda = a.device.startswith("cuda")
    body, ref, plan, notes = [], None, None, []
    rows = loop_rows(a)
    for i, row in enumerate(rows):
        if i and on_row is not None:
            on_row(_loop_table(a, plan, body, notes))
        print(f"loop row {i + 1}/{len(rows)}: {row['label']}", file=sys.stderr)
        if row["cuda_only"] and not cuda:
            body.append(f"| {row['label']} | n/a (CUDA only) | n/a (CUDA only) | n/a (CUDA only) | "
                        "n/a (CUDA only) | n/a (CUDA only) |")
            continue
        frames_path = tmp / f"loop_{i}.npy"
        spec = {k: row[k] for k in ("cfg_batch", "cuda_graphs", "teacache_threshold")}
        try:
            r = _run_worker("loop", a, ["--_row", json.dumps(spec), "--_frames", str(frames_path)])
        except RuntimeError as e:
            print(f"loop row {row['label']!r} failed:\n{e}", file=sys.stderr)
            body.append(f"| {row['label']} | failed (see stderr) | | | | |")
            continue
        frames = np.load(frames_path)
        if ref is None:
            ref = frames
        psnr = psnr_uint8(ref, frames)
        if frames is not ref:
            frames_path.unlink()
        plan = plan or r["plan"]
        label = row["label"]
        st = r["stats"]
        if row["cfg_batch"] and a.guidance != 1.0 and not st.get("cfg_batched"):
            label += " (ran as two passes: would not fit)"
        g = r["graphs"]
        if row["cuda_graphs"] and (g.get("eager_calls", 0) or g.get("fallbacks", 0)):
            label += f" ({g.get('replays', 0)} replays, {g.get('eager_calls', 0)} eager calls)"
        if not r["deterministic"]:
            notes.append(f"`{row['label']}`: the {a.repeats} timed runs did not give identical frames")
        tc = st.get("teacache")
        if tc:
            branches = ("cond", "uncond") if a.guidance != 1.0 else ("cond",)  # guidance 1: no uncond pass
            skipped = "/".join(str(tc[b]["skipped"]) if b in tc and b in branches else "–"
                               for b in ("cond", "uncond"))
            skipped += f" of {st['steps']}"
        else:
            skipped = "0/0 (off)"
        if i == 0:
            psnr_s = "— (reference)"
        else:
            psnr_s = "inf (identical)" if psnr == float("inf") else f"{psnr:.1f}"
        body.append(f"| {label} | {r['denoise'] / a.steps:.3g} | {r['total']:.3g} | {_fmt_mb(r['peak_mb'])} | "
                    f"{skipped} | {psnr_s} |")
    return _loop_table(a, plan, body, notes)


def _loop_table(a, plan: str | None, body: list[str], notes: list[str]) -> list[str]:
    """The loop-options caption, column header and the rows so far."""
    cuda = a.device.startswith("cuda")
    if not a.teacache_coefficients:
        coeffs = f"the preset's published {a.preset} coefficients"
    else:
        coeffs = f"coefficients {tuple(a.teacache_coefficients)}"
        if a.preset == "tiny":
            coeffs += (": the tiny random model has no published ones, and its time embedding changes by ~1 "
                       "(relative L1) per step at few steps, so each step adds ~0.1 to the accumulator")
    peak = ("`torch.cuda.max_memory_allocated` over the timed runs (weights included), reset after the warm-up"
            if cuda else "the row's own process peak resident set (VmHWM: load, warm-up and runs)")
    caption = (
        f"Loop options: random `{a.preset}` checkpoint, {a.height}x{a.width}, {a.frames} frames, {a.steps} steps, "
        f"CFG {a.guidance}, UniPC, seed {a.seed}, precision {a.precision}, backend {a.backend} (resolved: {plan})"
        f"{', torch.compile ' + a.compile if a.compile else ''}"
        f"{f', {a.threads} torch CPU thread(s)' if a.threads else ''}. Each row is its own process: load, a 2-step "
        f"warm-up at the same size and options, then the median of {a.repeats} timed video(s); the text encoder "
        "runs for every video (prompt cache off). Each row adds its option to the one above; the TeaCache rows "
        f"(mode \"{a.teacache_mode}\", {coeffs}) build on batched CFG{' + CUDA graphs' if cuda else ''}. "
        f"Peak memory: {peak}. PSNR: the decoded uint8 video against the reference row's, 10·log10(255²/MSE) "
        "over all frames and pixels. The weights are random, so the PSNR measures only the approximation error "
        "of each option (TeaCache's reuse of cached residuals, batched-CFG rounding), not the quality of a "
        "trained model's video."
    )
    columns = ("| configuration | s/step (denoise) | s/video (total) | peak memory | steps skipped (cond/uncond) "
               "| PSNR vs reference (dB) |")
    lines = [caption, "", columns, "|---|---|---|---|---|---|", *body]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return lines


def _written_preset(a):
    """The preset whose architecture the random checkpoint has: ``--preset``, resized by --dit-dim/--dit-layers."""
    import dataclasses

    from wanrt.presets import get_preset

    p = get_preset(a.preset)
    if a.dit_dim is None and a.dit_layers is None:
        return p
    dim = a.dit_dim or p.arch.dim
    arch = dataclasses.replace(p.arch, dim=dim, ffn_dim=4 * dim if a.dit_dim else p.arch.ffn_dim,
                               num_heads=max(1, dim // 64) if a.dit_dim else p.arch.num_heads,
                               num_layers=a.dit_layers or p.arch.num_layers)
    return dataclasses.replace(p, arch=arch)


def _config_words(a) -> str:
    """What the written checkpoint is, for the tables' captions."""
    from wanrt.presets import get_preset

    p = _written_preset(a)
    words = f"random `{a.preset}` checkpoint"
    if p.arch != get_preset(a.preset).arch:
        words += f" resized to DiT dim {p.arch.dim} x {p.arch.num_layers} layers"
    if a.vae_base_dim:
        words += f", VAE base dim {a.vae_base_dim}"
    return words


def run_pipelines(a, res: dict) -> list[str]:
    image = bool(_images(a))
    pipes = "WanVACEPipeline" if _task(a) == "vace" else "WanImageToVideoPipeline" if image else "WanPipeline"
    caption = (f"wanrt vs diffusers' {pipes}: {_config_words(a)} (diffusers layout, same weights for "
               f"both), {a.height}x{a.width}, {a.frames} frames, {a.steps} steps, CFG {a.guidance}, UniPC, precision "
               f"{a.precision}; median of {a.repeats} runs after one warm-up.")
    if _task(a) == "vace":
        caption += (" VACE inpainting: a source video, a mask generating its central half, one reference image; the "
                    "denoise column includes their VAE encodes, which diffusers' pipeline call performs together with "
                    "the loop.")
    elif image and _task(a) == "ti2v":
        caption += (" TI2V image-to-video: the denoise column includes the VAE encode of the image (the first latent "
                    "frame, its tokens at timestep 0), which diffusers' pipeline call performs together with the loop.")
    elif image:
        caption += (" The denoise column includes the image conditioning (CLIP and the VAE encode of the conditioning "
                    "video), which diffusers' pipeline call performs together with the loop.")
    den = "conditioning + denoise s" if image else "denoise s"
    lines = [
        caption,
        "",
        f"| pipeline | text encoder s | {den} | VAE decode s | total s | peak memory MiB |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in res.items():
        lines.append(f"| {k} | {r['text_encoder']:.3f} | {r['denoise']:.3f} | {r['vae_decode']:.3f} | "
                     f"{r['total']:.3f} | {r['peak_mb']:.0f} |")
    w, d = res["wanrt"], res["diffusers"]
    lines.append(f"| speedup (diffusers / wanrt) | {d['text_encoder'] / w['text_encoder']:.2f}x | "
                 f"{d['denoise'] / w['denoise']:.2f}x | {d['vae_decode'] / w['vae_decode']:.2f}x | "
                 f"{d['total'] / w['total']:.2f}x | |")
    return lines


def run_dit(a, r: dict) -> list[str]:
    caption = (f"DiT forward at the real t2v-1.3b dimensions (dim 1536, 30 layers), latent {tuple(a.dit_latent)} = "
               f"{r['tokens']} tokens + 512 text tokens, batch 1, precision {a.precision}, median of {a.repeats}:")
    return [
        caption,
        "",
        "| model | forward s | speedup |",
        "|---|---|---|",
        f"| diffusers WanTransformer3DModel | {r['diffusers']:.3f} | 1.00x |",
        f"| wanrt WanDiT (eager) | {r['wanrt']:.3f} | {r['diffusers'] / r['wanrt']:.2f}x |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ti2v-image", action="store_true",
                    help="TI2V presets (tiny-ti2v, ti2v-5b): image-to-video (a random image as the first frame; "
                         "diffusers' WanImageToVideoPipeline) instead of text-to-video")
    ap.add_argument("--preset", default="tiny", help="architecture of the random checkpoint (tiny, tiny-i2v, "
                    "tiny-flf2v, t2v-1.3b, t2v-14b, ...)")
    ap.add_argument("--precision", default=None, help="fp32|bf16|fp16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of every loop-options row")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads in every run (default: torch's own; 1 steadies CPU timings on a busy machine)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", nargs="+", choices=("loop", "pipelines", "dit"), default=["loop", "pipelines", "dit"],
                    help="which tables (default all; pipelines and dit need diffusers and are skipped without it)")
    ap.add_argument("--backend", default="auto", help="the Engine's kernel backend in the loop-options rows")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="torch.compile the DiT blocks in every loop-options row (default backend: inductor)")
    ap.add_argument("--teacache-thresholds", type=float, nargs="*", default=None, metavar="T",
                    help="TeaCache rows (default: 0.05 0.08 0.10 for t2v-1.3b, 0.14 0.20 for t2v-14b, "
                         "0.1 0.2 0.3 for tiny; none given: no TeaCache rows)")
    ap.add_argument("--teacache-mode", choices=("e", "e0"), default=None,
                    help="default: e for t2v-1.3b and tiny, e0 for t2v-14b")
    ap.add_argument("--teacache-coefficients", type=float, nargs="+", default=None, metavar="C",
                    help="rescaling polynomial, highest power first (default: the preset's published one; "
                         "0 0 0 0.1 0 for tiny)")
    ap.add_argument("--dit-latent", type=int, nargs=3, default=[3, 16, 16], metavar=("F", "H", "W"),
                    help="latent size of the real-dimension 1.3B DiT forward (default 3 16 16 = 192 tokens)")
    ap.add_argument("--skip-dit", action="store_true", help="skip the real-dimension DiT forward (same as "
                    "leaving dit out of --parts)")
    ap.add_argument("--dit-dim", type=int, default=None, help="the written checkpoint's DiT width (default: the "
                    "preset's; heads of 64, FFN 4x)")
    ap.add_argument("--dit-layers", type=int, default=None, help="the written checkpoint's DiT blocks")
    ap.add_argument("--vae-base-dim", type=int, default=None, help="the written checkpoint's VAE base width "
                    "(default: 8 for the tiny presets)")
    ap.add_argument("--prompt", default="a corgi surfing a wave, cinematic")
    ap.add_argument("--out", default=None, help="write the markdown tables here too")
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_frames", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.precision is None:
        a.precision = "bf16" if a.device.startswith("cuda") else "fp32"
    mode, thresholds, coeffs = LOOP_DEFAULTS.get(a.preset.lower(), ("e", (), None))
    a.teacache_mode = a.teacache_mode or mode
    a.teacache_thresholds = thresholds if a.teacache_thresholds is None else a.teacache_thresholds
    a.teacache_coefficients = a.teacache_coefficients or coeffs
    parts = [p for p in ("loop", "pipelines", "dit") if p in a.parts and not (p == "dit" and a.skip_dit)]

    if a._worker:
        if a.threads:
            torch.set_num_threads(a.threads)
        fn = {"wanrt": worker_wanrt, "diffusers": worker_diffusers, "dit": worker_dit, "loop": worker_loop}[a._worker]
        print(json.dumps(fn(a)))
        return

    from wanrt.checkpoints.tiny import write_checkpoint

    missing = _diffusers_missing() if {"pipelines", "dit"} & set(parts) else None
    lines = [header("bench_e2e", a.device)]
    with tempfile.TemporaryDirectory() as tmp:
        if "loop" in parts or ("pipelines" in parts and not missing):
            t0 = time.perf_counter()
            a.ckpt = str(write_checkpoint(Path(tmp) / "ckpt", layout="diffusers", preset=_written_preset(a),
                                          vae_base_dim=a.vae_base_dim))
            print(f"wrote a random {a.preset} checkpoint in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if "loop" in parts:
            def partial(table: list[str]) -> None:  # a cut-short run keeps its finished rows
                if a.out:
                    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.out).write_text("\n".join([*lines, "", *table, "", "(partial: the run is not finished)"]))

            lines += ["", *run_loop(a, Path(tmp), partial)]
        if missing and {"pipelines", "dit"} & set(parts):
            lines += ["", (f"wanrt vs diffusers (pipelines, DiT forward): skipped, `import diffusers` failed "
                          f"({missing}).")]
        elif "pipelines" in parts:
            res = {k: _run_worker(k, a) for k in ("wanrt", "diffusers")}
            lines += ["", *run_pipelines(a, res)]
    if "dit" in parts and not missing:
        lines += ["", *run_dit(a, _run_worker("dit", a))]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
