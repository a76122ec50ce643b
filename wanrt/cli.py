"""The ``wanrt`` command line: ``wanrt generate``, ``wanrt calibrate-teacache``, ``wanrt make-tiny-checkpoint``."""

from __future__ import annotations

import argparse
import sys

from .presets import PRESETS

# wanrt.ops.backends.BACKEND_NAMES, kept here so `wanrt --help` does not import torch (a test checks they agree).
BACKEND_CHOICES = ("eager", "sdpa", "triton", "flash-attn", "sageattention", "xformers", "auto")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wanrt", description="wanrt: a lean, fast inference runtime for the Wan2.1 video models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate a video from a text prompt (and an image) and write an MP4",
                       description="Generate a video with a Wan2.1 model and write it as an MP4 (16 fps).")
    _add_model_args(g)
    g.add_argument("-o", "--output", default="output.mp4", help="output MP4 path (default: output.mp4)")
    g.add_argument("--teacache-threshold", type=float, default=None,
                   help="TeaCache step skipping (e.g. 0.08 for t2v-1.3b, 0.2 with --teacache-mode e0 for 14B; "
                        "default: off)")
    g.add_argument("--teacache-mode", default=None, choices=["e", "e0"], help="TeaCache input (default: e)")
    g.add_argument("--teacache-coefficients", default=None,
                   help="JSON file written by `wanrt calibrate-teacache` (default: the preset's coefficients)")
    g.add_argument("--cfg-batch", default="auto", choices=["auto", "on", "off"],
                   help="both CFG branches in one batch-2 forward (auto: on CUDA when memory allows)")
    g.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay the DiT from CUDA graphs (auto: on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks")
    g.add_argument("--text-encoder-precision", default=None, choices=["bf16", "fp32", "fp8", "int8", "int8-wo"],
                   help="UMT5 precision (default: bf16; 8-bit quantizes its attention and FFN layers)")
    g.add_argument("--text-encoder-device", default=None, help="where UMT5 runs, e.g. cpu (default: --device)")
    g.add_argument("--offload-text-encoder", action="store_true",
                   help="keep UMT5 on the CPU and move it to its device only while encoding")
    g.add_argument("--offload-image-encoder", action="store_true",
                   help="i2v/flf2v: keep the CLIP image encoder on the CPU and move it to the device only while encoding")

    c = sub.add_parser("calibrate-teacache", help="fit TeaCache coefficients for a checkpoint and resolution",
                       description="Run one uncached generation, record how much the time-embedding input and "
                                   "the velocity change per step, and fit the TeaCache rescaling polynomial.")
    _add_model_args(c)
    c.add_argument("--mode", default="e", choices=["e", "e0"], help="which time embedding to watch (default: e)")
    c.add_argument("-o", "--output", default="teacache.json", help="output JSON (default: teacache.json)")
    x = sub.add_parser("export-vae", help="export the VAE decoder step to ONNX (and build a TensorRT engine)",
                       description="Export one causal decoder step of the VAE (one latent frame in, its frames out, "
                                   "the cache as explicit inputs/outputs) to ONNX for a fixed size; with --format "
                                   "tensorrt also build (or reuse) a TensorRT engine under build/trt.")
    x.add_argument("--model", default="tiny", help=f"model preset: {', '.join(PRESETS)} (default: tiny)")
    x.add_argument("--checkpoint-dir", default=None, help="checkpoint folder; optional for --model tiny")
    x.add_argument("--height", type=int, required=True, help="video height in pixels (multiple of 16)")
    x.add_argument("--width", type=int, required=True, help="video width in pixels (multiple of 16)")
    x.add_argument("--batch", type=int, default=1, help="batch size of the exported graph (default 1)")
    x.add_argument("--format", default="onnx", choices=["onnx", "tensorrt"], help="onnx, or onnx + TensorRT")
    x.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="graph precision (default fp32)")
    x.add_argument("--device", default="cpu", help="device the export traces on (default cpu)")
    x.add_argument("-o", "--output", default="vae_decoder.onnx", help="output .onnx path")
    _more_parsers(sub)
    return parser


def _add_model_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--model", default="tiny", help=f"model preset: {', '.join(PRESETS)} (default: tiny)")
    g.add_argument("--checkpoint-dir", default=None,
                   help="checkpoint folder (official or diffusers layout); optional for --model tiny")
    g.add_argument("--prompt", required=True, help="text prompt")
    g.add_argument("--image", default=None,
                   help="i2v/flf2v: the first frame (an image file); the video keeps its aspect ratio")
    g.add_argument("--last-image", default=None, help="flf2v: the last frame (an image file)")
    g.add_argument("--max-area", type=_area, default=None,
                   help="i2v/flf2v: output pixel area, as pixels or W*H (e.g. 832*480; default: the preset's)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (default: the official one)")
    g.add_argument("--height", type=int, default=None, help="height in pixels, a multiple of 16")
    g.add_argument("--width", type=int, default=None, help="width in pixels, a multiple of 16")
    g.add_argument("--num-frames", type=int, default=None, help="frames, 4k+1 (81 = 5 s)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--shift", type=float, default=None, help="flow-matching sigma shift")
    g.add_argument("--solver", default=None, choices=["unipc", "dpm++", "euler"], help="sampling solver")
    g.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16", "fp8", "int8", "int8-wo"],
                   help="DiT weights precision (fp8 / int8: 8-bit attention and FFN layers, bf16 compute)")
    g.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="DiT kernels: auto (fastest eligible, default), eager (reference), sdpa, triton, "
                        "flash-attn, sageattention, xformers")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _more_parsers(sub) -> None:
    t = sub.add_parser("make-tiny-checkpoint",
                       help="write a random-initialized checkpoint in a real layout (no download)",
                       description="Write a random-initialized Wan2.1 checkpoint in the official or diffusers "
                                   "layout, with a small self-built tokenizer.")
    t.add_argument("dir", help="output folder (must be empty or absent)")
    t.add_argument("--layout", default="official", choices=["official", "diffusers"])
    t.add_argument("--preset", default="tiny",
                   help="tiny, tiny-i2v, tiny-flf2v, or a full-size preset such as t2v-1.3b")
    t.add_argument("--shards", type=int, default=1, help="split the DiT weights into N safetensors shards")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def _area(text: str) -> int:
    """``--max-area``: pixels (``399360``) or a product (``832*480``, ``832x480``)."""
    parts = text.lower().replace("x", "*").split("*")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pixels or W*H (e.g. 832*480), got {text!r}") from None
    if len(values) > 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected pixels or W*H (e.g. 832*480), got {text!r}")
    return values[0] * (values[1] if len(values) == 2 else 1)


def _sampling(args):
    """Check the sampling arguments and the images before any weight is loaded (minutes for a 14B model)."""
    from .engine import image_size, resolve_sampling_args
    from .presets import get_preset

    preset = get_preset(args.model)
    height, width, max_area = args.height, args.width, args.max_area
    if preset.task == "t2v":
        for flag, value in (("--image", args.image), ("--last-image", args.last_image), ("--max-area", max_area)):
            if value is not None:
                raise ValueError(f"{flag} needs an i2v/flf2v model; {preset.name} is text-to-video")
    else:
        from .images import load_image

        if args.image is None:
            raise ValueError(f"--model {preset.name} ({preset.task}) needs --image")
        if preset.task == "flf2v" and args.last_image is None:
            raise ValueError(f"--model {preset.name} (first-last-frame) needs --last-image")
        if preset.task == "i2v" and args.last_image is not None:
            raise ValueError(f"--last-image needs a first-last-frame (flf2v) model; {preset.name} is i2v")
        first = load_image(args.image, name="--image")
        if args.last_image is not None:
            load_image(args.last_image, name="--last-image")
        height, width, max_area = image_size(preset, tuple(first.shape[1:]), height=height, width=width,
                                             max_area=max_area)
    return resolve_sampling_args(
        preset, height=height, width=width, num_frames=args.num_frames, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, shift=args.shift, sample_solver=args.solver, seed=args.seed,
        max_area=max_area,
    )


def _generate(args) -> int:
    from pathlib import Path

    sampling = _sampling(args)
    if Path(args.output).suffix.lower() != ".mp4":
        raise ValueError(f"--output must end in .mp4, got {args.output!r}")
    coefficients = mode = None
    if args.teacache_coefficients is not None:
        mode, coefficients = _read_coefficients(args.teacache_coefficients)
    on_off = {"auto": None, "on": True, "off": False}
    engine = _engine(args, cfg_batch=on_off[args.cfg_batch], cuda_graphs=on_off[args.cuda_graphs],
                     compile=args.compile, text_encoder_precision=args.text_encoder_precision,
                     text_encoder_device=args.text_encoder_device, offload_text_encoder=args.offload_text_encoder,
                     offload_image_encoder=args.offload_image_encoder)
    video = engine.generate(
        args.prompt, args.negative_prompt, image=args.image, last_image=args.last_image, max_area=args.max_area,
        height=args.height, width=args.width, num_frames=args.num_frames,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, shift=args.shift,
        sample_solver=args.solver, seed=sampling.seed, progress=not args.no_progress,
        teacache_threshold=args.teacache_threshold, teacache_mode=args.teacache_mode or mode,
        teacache_coefficients=coefficients,
    )
    path = video.save(args.output)
    f, h, w, _ = video.frames.shape
    print(f"wrote {path} ({f} frames, {w}x{h}, {video.fps} fps), seed {video.seed}")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in video.timings.items())
          + f" (backend {engine.plan.name})")
    if "teacache" in video.stats:
        print("teacache: " + "; ".join(f"{b} computed {c['computed']}, skipped {c['skipped']}"
                                        for b, c in video.stats["teacache"].items()))
    return 0


def _engine(args, **options):
    from .engine import Engine

    if args.checkpoint_dir is None:
        return Engine(args.model, device=args.device, precision=args.precision, backend=args.backend, **options)
    return Engine(args.model, args.checkpoint_dir, device=args.device, precision=args.precision,
                  backend=args.backend, **options)


def _read_coefficients(path: str) -> tuple[str | None, tuple[float, ...]]:
    """``(mode, coefficients)`` from a `wanrt calibrate-teacache` JSON file."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
        coefficients = tuple(float(c) for c in data["coefficients"])
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a TeaCache coefficients file (need a JSON object with a "
                         f"'coefficients' list): {e}") from e
    return data.get("mode"), coefficients


def _calibrate(args) -> int:
    import json
    from pathlib import Path

    sampling = _sampling(args)
    engine = _engine(args)
    images = {"image": args.image, "last_image": args.last_image, "max_area": args.max_area}
    if engine.preset.task == "t2v":
        images = {}
    result = engine.calibrate_teacache(
        args.prompt, mode=args.mode, negative_prompt=args.negative_prompt, **images, height=args.height,
        width=args.width,
        num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        shift=args.shift, sample_solver=args.solver, seed=sampling.seed, progress=not args.no_progress,
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    coefs = ", ".join(f"{c:.6g}" for c in result["coefficients"])
    print(f"wrote {out}: mode {result['mode']}, coefficients [{coefs}] from {len(result['input_changes'])} steps")
    print(f"use: wanrt generate ... --teacache-threshold T --teacache-coefficients {out}")
    return 0


def _export_vae(args) -> int:
    import torch

    from .checkpoints.loaders import load_vae

    for name, v in (("height", args.height), ("width", args.width)):
        if v <= 0 or v % 16:
            raise ValueError(f"--{name} must be a positive multiple of 16, got {v}")
    if not str(args.output).endswith(".onnx"):
        raise ValueError(f"--output must end in .onnx, got {args.output!r}")
    if args.format == "tensorrt":
        from .graph.tensorrt_vae import require_tensorrt

        require_tensorrt()  # fail before the export
    ckpt = args.checkpoint_dir
    if ckpt is None:
        if args.model != "tiny":
            raise ValueError(f"--model {args.model} needs --checkpoint-dir")
        from .checkpoints.tiny import cached_tiny_checkpoint

        ckpt = cached_tiny_checkpoint("official")
    from .graph.onnx_vae import export_decoder_onnx

    vae = load_vae(ckpt, device=args.device, dtype=torch.float32)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    onnx = export_decoder_onnx(vae, args.output, height=args.height, width=args.width, batch=args.batch, dtype=dtype)
    print(f"wrote {onnx} (+ {onnx.with_suffix('.first.onnx').name}, {onnx.with_suffix('.json').name})")
    if args.format == "tensorrt":
        from .graph.tensorrt_vae import build_decoder_engine

        print(f"TensorRT engine: {build_decoder_engine(onnx, 'build/trt', fp16=args.dtype == 'fp16')}")
    return 0


def _make_tiny(args) -> int:
    from .checkpoints.tiny import write_checkpoint

    out = write_checkpoint(args.dir, layout=args.layout, preset=args.preset, seed=args.seed, shards=args.shards)
    print(f"wrote a random {args.preset} checkpoint in the {args.layout} layout to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wanrt`` command. Returns the exit code (2 for bad arguments or input)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        commands = {"generate": _generate, "calibrate-teacache": _calibrate, "export-vae": _export_vae,
                    "make-tiny-checkpoint": _make_tiny}
        return commands[args.command](args)
    except Exception as e:
        backends = sys.modules.get("wanrt.ops.backends")  # loaded by then if a backend was resolved
        usage = (ValueError, FileNotFoundError) + ((backends.BackendUnavailableError,) if backends else ())
        if not isinstance(e, usage):
            raise
        print(f"wanrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
