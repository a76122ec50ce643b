"""End-to-end benchmark: wanrt eager against diffusers' WanPipeline, same weights and settings.

Prints (and with --out writes) a markdown table of per-stage seconds (text encoder, denoising, VAE
decode) and peak memory, then a DiT forward at the real t2v-1.3b dimensions on a small latent.

Each pipeline runs in its own subprocess so that peak memory is its own (CUDA: max_memory_allocated;
CPU: the process's peak resident set). Timings are medians over --repeats runs after a warm-up run.

    python benchmarks/bench_e2e.py                       # CPU: tiny model, 64x96, 9 frames, 4 steps
    python benchmarks/bench_e2e.py --device cuda --preset t2v-1.3b --height 480 --width 832 --frames 81 --steps 50
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

import torch

from common import emit, header, vm_hwm_mb


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


def worker_wanrt(a) -> dict:
    import wanrt

    engine = wanrt.Engine.from_pretrained(a.ckpt, device=a.device, precision=a.precision)
    kw = dict(height=a.height, width=a.width, num_frames=a.frames, num_inference_steps=a.steps,
              guidance_scale=a.guidance, sample_solver="unipc", seed=0, progress=False)
    runs = []
    for _ in range(a.repeats + 1):
        v = engine.generate(a.prompt, **kw)
        runs.append(v.timings)
    runs = runs[1:]
    return {k: statistics.median(r[k] for r in runs) for k in ("text_encoder", "denoise", "vae_decode", "total")} | {
        "peak_mb": _peak_mb(a.device)}


def worker_diffusers(a) -> dict:
    import diffusers

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    pipe = diffusers.WanPipeline.from_pretrained(a.ckpt, torch_dtype=dtype)
    pipe.vae.to(torch.float32)
    pipe.to(a.device)
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for _ in range(a.repeats + 1):
        g = torch.Generator("cpu").manual_seed(0)
        (pe, ne), t_text = _timed(a.device, lambda: pipe.encode_prompt(
            a.prompt, None, do_classifier_free_guidance=a.guidance > 1, device=a.device))
        lat, t_den = _timed(a.device, lambda: pipe(
            prompt_embeds=pe, negative_prompt_embeds=ne, height=a.height, width=a.width, num_frames=a.frames,
            num_inference_steps=a.steps, guidance_scale=a.guidance, generator=g, output_type="latent").frames)

        def decode():
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


def _run_worker(kind: str, a) -> dict:
    cmd = [sys.executable, __file__, "--_worker", kind] + [x for x in sys.argv[1:] if x != "--_worker"]
    if a.ckpt:
        cmd += ["--ckpt", a.ckpt]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="tiny", help="architecture of the random checkpoint (tiny, t2v-1.3b)")
    ap.add_argument("--precision", default=None, help="fp32|bf16|fp16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dit-latent", type=int, nargs=3, default=[3, 16, 16], metavar=("F", "H", "W"),
                    help="latent size of the real-dimension 1.3B DiT forward (default 3 16 16 = 192 tokens)")
    ap.add_argument("--skip-dit", action="store_true", help="skip the real-dimension DiT forward")
    ap.add_argument("--prompt", default="a corgi surfing a wave, cinematic")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.precision is None:
        a.precision = "bf16" if a.device.startswith("cuda") else "fp32"

    if a._worker:
        fn = {"wanrt": worker_wanrt, "diffusers": worker_diffusers, "dit": worker_dit}[a._worker]
        print(json.dumps(fn(a)))
        return

    from wanrt.checkpoints.tiny import write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        a.ckpt = str(write_checkpoint(Path(tmp) / "ckpt", layout="diffusers", preset=a.preset))
        res = {k: _run_worker(k, a) for k in ("wanrt", "diffusers")}
    lines = [
        header("bench_e2e", a.device),
        "",
        f"Random `{a.preset}` checkpoint (diffusers layout, same weights for both), {a.height}x{a.width}, "
        f"{a.frames} frames, {a.steps} steps, CFG {a.guidance}, UniPC, precision {a.precision}; "
        f"median of {a.repeats} runs after one warm-up.",
        "",
        "| pipeline | text encoder s | denoise s | VAE decode s | total s | peak memory MiB |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in res.items():
        lines.append(f"| {k} | {r['text_encoder']:.3f} | {r['denoise']:.3f} | {r['vae_decode']:.3f} | "
                     f"{r['total']:.3f} | {r['peak_mb']:.0f} |")
    w, d = res["wanrt"], res["diffusers"]
    lines.append(f"| speedup (diffusers / wanrt) | {d['text_encoder'] / w['text_encoder']:.2f}x | "
                 f"{d['denoise'] / w['denoise']:.2f}x | {d['vae_decode'] / w['vae_decode']:.2f}x | "
                 f"{d['total'] / w['total']:.2f}x | |")
    if not a.skip_dit:
        r = _run_worker("dit", a)
        lines += [
            "",
            f"DiT forward at the real t2v-1.3b dimensions (dim 1536, 30 layers), latent {tuple(a.dit_latent)} = "
            f"{r['tokens']} tokens + 512 text tokens, batch 1, precision {a.precision}, median of {a.repeats}:",
            "",
            "| model | forward s | speedup |",
            "|---|---|---|",
            f"| diffusers WanTransformer3DModel | {r['diffusers']:.3f} | 1.00x |",
            f"| wanrt WanDiT (eager) | {r['wanrt']:.3f} | {r['diffusers'] / r['wanrt']:.2f}x |",
        ]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
