"""The ``wanrt`` command line: ``wanrt generate``, ``wanrt calibrate-teacache``, ``wanrt make-tiny-checkpoint``."""

from __future__ import annotations

import argparse
import os
import sys

from .config import BACKENDS, PRECISIONS, SOLVERS, TEACACHE_MODES, TEXT_ENCODER_PRECISIONS
from .presets import PRESETS

BACKEND_CHOICES = BACKENDS  # the vocabularies live in wanrt.config


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wanrt", description="wanrt: a lean, fast inference runtime for the Wan2.1 video models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate a video from a text prompt (and an image) and write an MP4",
                       description="Generate a video with a Wan2.1 model and write it as an MP4 (16 fps).")
    _add_model_args(g)
    g.add_argument("-o", "--output", default="output.mp4",
                   help="output MP4 path (default: output.mp4); .png/.jpg/.webp writes one image (text-to-image: "
                        "--num-frames defaults to 1)")
    g.add_argument("--crf", type=int, default=18,
                   help="x264 constant rate factor of the MP4, 0 (lossless coding) to 51; lower is better "
                        "(default: 18)")
    g.add_argument("--teacache-threshold", type=float, default=None,
                   help="TeaCache step skipping (e.g. 0.08 for t2v-1.3b, 0.2 with --teacache-mode e0 for 14B; "
                        "default: off)")
    g.add_argument("--teacache-mode", default=None, choices=TEACACHE_MODES, help="TeaCache input (default: e)")
    lo = g.add_argument_group("LoRA and few-step sampling")
    _add_lora_args(lo)
    lo.add_argument("--timesteps", type=float, nargs="+", default=None, metavar="T",
                    help="a custom schedule on the 0..1000 scale, shifted by --shift (e.g. the 4-step distill "
                         "LoRAs: 1000 750 500 250 --shift 5 --solver euler --guidance-scale 1)")
    lo.add_argument("--sigmas", type=float, nargs="+", default=None, metavar="S",
                    help="a custom schedule of sigmas in (0, 1], used as given")
    g.add_argument("--teacache-coefficients", default=None,
                   help="JSON file written by `wanrt calibrate-teacache` (default: the preset's coefficients)")
    _add_engine_options(g)
    _add_parallel_args(g)

    v = sub.add_parser("serve", help="run an OpenAI-compatible video service (/v1/videos) with a web page",
                       description="Serve the model over HTTP: OpenAI's videos API with Wan's fields, a durable job "
                                   "queue (SQLite under --data-dir), live progress as Server-Sent Events, /health, "
                                   "/metrics and a web page at /. Needs `pip install 'wanrt[serve]'`.")
    v.add_argument("--model", default="tiny", help=f"model preset: {', '.join(PRESETS)} (default: tiny)")
    v.add_argument("--checkpoint-dir", default=None, help="checkpoint folder; optional for --model tiny")
    _add_files_args(v)
    v.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    v.add_argument("--devices", default=None,
                   help="one Engine per GPU, all taking jobs from the one queue, e.g. 0,1,2,3")
    v.add_argument("--precision", default="bf16", choices=list(PRECISIONS), help="DiT weights precision")
    v.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="DiT kernels (default: auto)")
    v.add_argument("--teacache-threshold", type=float, default=None,
                   help="the Engine's default TeaCache threshold (requests may set their own)")
    _add_engine_options(v)
    _add_lora_args(v.add_argument_group("LoRA"))
    _add_parallel_args(v)
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY on every endpoint but /health and / (default: "
                        "$WANRT_API_KEY, else none)")
    v.add_argument("--data-dir", default="wanrt-serve", help="job database, uploads and videos (default: ./wanrt-serve)")
    v.add_argument("--max-queue", type=_positive, default=32, help="queued jobs at most (then 429)")
    v.add_argument("--max-frames", type=_positive, default=None, help="refuse requests with more frames")
    v.add_argument("--max-area", type=_area, default=None, help="refuse larger sizes (pixels or W*H)")
    v.add_argument("--max-steps", type=_positive, default=None, help="refuse more denoising steps")
    v.add_argument("--grace-s", type=float, default=30.0,
                   help="on SIGTERM, seconds the running job may take to finish before it is cancelled and re-queued")
    v.add_argument("--cors-origin", default=None, help="allow this origin (CORS off otherwise)")
    v.add_argument("--no-warmup", action="store_true", help="take jobs at once, without warming the Engines up")

    c = sub.add_parser("calibrate-teacache", help="fit TeaCache coefficients for a checkpoint and resolution",
                       description="Run one uncached generation, record how much the time-embedding input and "
                                   "the velocity change per step, and fit the TeaCache rescaling polynomial.")
    _add_model_args(c)
    c.add_argument("--mode", default="e", choices=TEACACHE_MODES, help="which time embedding to watch (default: e)")
    c.add_argument("-o", "--output", default="teacache.json", help="output JSON (default: teacache.json)")
    x = sub.add_parser("export-vae", help="export the VAE decoder step to ONNX (and build a TensorRT engine)",
                       description="Export one causal decoder step of the VAE (one latent frame in, its frames out, "
                                   "the cache as explicit inputs/outputs) to ONNX for a fixed size; with --format "
                                   "tensorrt also build (or reuse) a TensorRT engine in the cache ($WANRT_CACHE_DIR/trt, default "
                                   "~/.cache/wanrt/trt).")
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


def _add_engine_options(g) -> None:
    """The Engine's options shared by ``generate`` and ``serve``."""
    g.add_argument("--cfg-batch", default="auto", choices=["auto", "on", "off"],
                   help="both CFG branches in one batch-2 forward (auto: on CUDA when memory allows)")
    g.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay the DiT from CUDA graphs (auto: on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks")
    g.add_argument("--text-encoder-precision", default=None, choices=TEXT_ENCODER_PRECISIONS,
                   help="UMT5 precision (default: bf16; 8-bit quantizes its attention and FFN layers)")
    g.add_argument("--text-encoder-device", default=None, help="where UMT5 runs, e.g. cpu (default: --device)")
    g.add_argument("--offload-text-encoder", action="store_true",
                   help="keep UMT5 on the CPU and move it to its device only while encoding")
    g.add_argument("--offload-image-encoder", action="store_true",
                   help="i2v/flf2v: keep the CLIP image encoder on the CPU and move it to the device only while encoding")
    o = g.add_argument_group("small GPUs", "where the parts live (engine.memory_plan); see the README's offload section")
    o.add_argument("--offload", default=None, choices=["none", "model", "block"],
                   help="none (all on the GPU), model (each part on the GPU only while it runs), block (the DiT "
                        "blocks stream from host memory); default: none, or chosen for --vram-budget-gb")
    o.add_argument("--vram-budget-gb", type=float, default=None,
                   help="plan for this much GPU memory (GiB); refused before loading onto the GPU when it cannot be "
                        "met, naming the smallest feasible budget")
    o.add_argument("--expert-swap", default="auto", choices=["auto", "on", "off"],
                   help="Wan2.2 A14B: one expert on the GPU at a time (on), both (off), or on when both do not fit "
                        "(auto)")
    o.add_argument("--offload-to-disk", action="store_true",
                   help="with block offload: read the streamed blocks from the checkpoint file at each copy instead "
                        "of holding them in host memory")


def _add_parallel_args(g) -> None:
    p = g.add_argument_group("many GPUs", "under `torchrun --nproc-per-node N -m wanrt COMMAND ...`, or with "
                             "--nproc N; without a layout flag the layout is chosen for the world size (auto)")
    p.add_argument("--nproc", type=_positive, default=None,
                   help="start N processes on this machine through torchrun's launcher (torch.distributed.run)")
    p.add_argument("--ulysses", type=_positive, default=None, help="Ulysses (all-to-all) sequence-parallel degree")
    p.add_argument("--ring", type=_positive, default=None, help="Ring attention sequence-parallel degree")
    p.add_argument("--cfg-parallel", action="store_true", help="the two guidance branches on two halves of the ranks")
    p.add_argument("--shard-weights", action="store_true", help="shard the DiT's Linears over the ranks (FSDP2)")


def _add_lora_args(lo) -> None:
    lo.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="apply a LoRA (any common format; repeatable; strength default 1)")
    lo.add_argument("--lora-mode", default="fuse", choices=["fuse", "runtime"],
                    help="fuse into the weights (default) or run as a low-rank branch beside them")
    lo.add_argument("--lora-high", action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="Wan2.2 A14B: a LoRA for the high-noise expert only (the speed LoRAs' high half)")
    lo.add_argument("--lora-low", action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="Wan2.2 A14B: a LoRA for the low-noise expert only")


def _add_files_args(g) -> None:
    f = g.add_argument_group("single files", "instead of --checkpoint-dir, one file per part (ComfyUI's downloads)")
    f.add_argument("--dit", default=None, help="the DiT: .safetensors (fp16/bf16/fp8/fp8-scaled) or .gguf (Wan2.2 "
                                               "A14B: the high-noise expert)")
    f.add_argument("--dit-2", default=None, help="Wan2.2 A14B: the low-noise expert's file")
    f.add_argument("--text-encoder", default=None, help="UMT5 .safetensors (also umt5_xxl_fp8_e4m3fn_scaled)")
    f.add_argument("--vae", default=None, help="wan_2.1_vae.safetensors")
    f.add_argument("--image-encoder", default=None, help="i2v/flf2v: clip_vision_h.safetensors")
    f.add_argument("--tokenizer", default=None, help="a tokenizer folder, when the text-encoder file carries none")


def _add_model_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--model", default="tiny", help=f"model preset: {', '.join(PRESETS)} (default: tiny)")
    g.add_argument("--checkpoint-dir", default=None,
                   help="checkpoint folder (official or diffusers layout); optional for --model tiny")
    _add_files_args(g)
    g.add_argument("--prompt", required=True, help="text prompt")
    g.add_argument("--image", default=None,
                   help="i2v/flf2v: the first frame (an image file); the video keeps its aspect ratio")
    g.add_argument("--last-image", default=None, help="flf2v: the last frame (an image file)")
    g.add_argument("--max-area", type=_area, default=None,
                   help="i2v/flf2v: output pixel area, as pixels or W*H (e.g. 832*480; default: the preset's)")
    v = g.add_argument_group("VACE", "vace-1.3b / vace-14b (video editing; see the README's recipes)")
    v.add_argument("--video", default=None,
                   help="a source or control video file (resized to cover the output and centre-cropped); "
                        "without --height/--width the output keeps its aspect ratio within the preset's area")
    v.add_argument("--mask", default=None,
                   help="a mask video of the same frame count: white = generate, black = keep")
    v.add_argument("--reference-image", action="append", default=None, metavar="IMAGE",
                   help="a subject or style image (repeat for several); fitted on a white canvas")
    v.add_argument("--conditioning-scale", type=float, default=None,
                   help="how strongly the video, mask and references steer (default 1.0)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (default: the official one)")
    g.add_argument("--height", type=int, default=None, help="height in pixels, a multiple of 16")
    g.add_argument("--width", type=int, default=None, help="width in pixels, a multiple of 16")
    g.add_argument("--num-frames", type=int, default=None, help="frames, 4k+1 (81 = 5 s)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (Wan2.2 A14B: the high-noise expert's)")
    w = g.add_argument_group("Wan2.2 A14B", "t2v-a14b / i2v-a14b: two experts switched at the boundary")
    w.add_argument("--guidance-scale-2", type=float, default=None,
                   help="the low-noise expert's guidance scale (default: official, 3.0 t2v / 3.5 i2v)")
    w.add_argument("--boundary", type=float, default=None,
                   help="switch to the low-noise expert below this fraction of 1000 timesteps (default: 0.875 "
                        "t2v / 0.9 i2v)")
    g.add_argument("--shift", type=float, default=None, help="flow-matching sigma shift")
    g.add_argument("--solver", default=None, choices=SOLVERS, help="sampling solver")
    g.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--precision", default="bf16", choices=list(PRECISIONS),
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
                   help="tiny, tiny-i2v, tiny-flf2v, tiny-vace, tiny-ti2v, tiny-a14b, tiny-i2v-a14b, or a full-size "
                        "preset such as t2v-1.3b")
    t.add_argument("--shards", type=int, default=1, help="split the DiT weights into N safetensors shards")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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


def _expert_options(args) -> dict:
    """``guidance_scale_2`` / ``boundary`` when given (Wan2.2 A14B; refused by the request for one DiT)."""
    return {k: v for k, v in (("guidance_scale_2", getattr(args, "guidance_scale_2", None)),
                              ("boundary", getattr(args, "boundary", None))) if v is not None}


def _request(args, **teacache):
    """The request, resolved once and judged before any weight is loaded (minutes for a 14B model): sizes,
    frames, steps, numbers, the images, and the memory it needs on the device."""
    from .checkpoints.loaders import _device
    from .presets import get_preset
    from .request import check_fits, resolve_request

    preset = get_preset(args.model)
    if preset.task == "vace":
        for flag, value in (("--image", args.image), ("--last-image", args.last_image)):
            if value is not None:
                raise ValueError(f"{flag} needs an i2v/flf2v model; {preset.name} is VACE: give the frames to keep "
                                 "as --video with --mask, or subject images as --reference-image")
    elif preset.task == "t2v":
        for flag, value in (("--image", args.image), ("--last-image", args.last_image), ("--max-area", args.max_area)):
            if value is not None:
                raise ValueError(f"{flag} needs an i2v/flf2v model; {preset.name} is text-to-video")
    elif preset.task == "ti2v":
        if args.last_image is not None:
            raise ValueError(f"--last-image needs a first-last-frame (flf2v) model; {preset.name} takes one --image")
    elif args.image is None:
        raise ValueError(f"--model {preset.name} ({preset.task}) needs --image")
    elif preset.task == "flf2v" and args.last_image is None:
        raise ValueError(f"--model {preset.name} (first-last-frame) needs --last-image")
    elif preset.task == "i2v" and args.last_image is not None:
        raise ValueError(f"--last-image needs a first-last-frame (flf2v) model; {preset.name} is i2v")
    req = resolve_request(
        preset, args.prompt, args.negative_prompt, image=args.image, last_image=args.last_image,
        max_area=args.max_area, height=args.height, width=args.width, num_frames=args.num_frames,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, shift=args.shift,
        sample_solver=args.solver, seed=args.seed, timesteps=getattr(args, "timesteps", None),
        sigmas=getattr(args, "sigmas", None), video=args.video, mask=args.mask, reference_images=args.reference_image,
        conditioning_scale=args.conditioning_scale, **_expert_options(args), **teacache)
    sp = (getattr(args, "ulysses", None) or 1) * (getattr(args, "ring", None) or 1)  # ranks sharing the tokens
    check_fits(req, preset, _device(args.device), sequence_parallel=sp)
    return req


def _launch(args, argv: list[str]) -> int:
    """``--nproc N``: run this same command on N local processes with torchrun's launcher (``--standalone``: a
    rendezvous on a free local port). Returns 0, or the exit code of the first rank that failed (2 bad input, 1 a
    failure, 130 cancelled; its error is already printed)."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {args.nproc}: this machine has {torch.cuda.device_count()} CUDA device(s), one per "
                         "process; for several machines run torchrun on each (--nnodes, --rdzv-endpoint)")

    rest, skip = [], False
    for a in argv:  # the command without --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    try:
        torchrun(["--standalone", "--nproc-per-node", str(args.nproc), "-m", "wanrt", *rest])
    except SignalException as e:  # SIGTERM/SIGINT to the launcher: it has stopped the ranks (serve drains rank 0)
        print(f"wanrt {args.command}: stopped by signal {int(e.sigval)}", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        print(f"wanrt {args.command}: rank {', '.join(map(str, codes))} failed (exit code "
              f"{', '.join(str(c) for c in codes.values())}); their errors are above", file=sys.stderr)
        return next((c for c in codes.values() if c in (2, 1, 130)), 1)  # a rank's own exit code, not the launcher's kill
    return 0


def _offload_options(args) -> dict:
    """``offload`` / ``vram_budget_gb`` for the Engine, only those given (the Engine's defaults otherwise)."""
    out = {}
    if args.offload is not None:
        out["offload"] = "auto" if args.offload == "none" and args.vram_budget_gb is not None else args.offload
    if args.vram_budget_gb is not None:
        out["vram_budget_gb"] = args.vram_budget_gb
    if args.offload_to_disk:
        out["offload_to_disk"] = True
    swap = getattr(args, "expert_swap", "auto")
    if swap != "auto":
        out["expert_swap"] = swap == "on"
    return out


def _parallel(args):
    """The layout from the flags (None for one process): under torchrun (WORLD_SIZE set) or with a layout flag,
    the process group is set up here; no flag means ``"auto"``."""
    import os

    flags = args.ulysses is not None or args.ring is not None or args.cfg_parallel or args.shard_weights
    if not flags and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from . import distributed
    from .parallel.config import ParallelConfig

    distributed.init()  # RuntimeError naming torchrun when its environment is missing
    if not flags:
        return "auto"
    return ParallelConfig(ulysses=args.ulysses or 1, ring=args.ring or 1, cfg=2 if args.cfg_parallel else 1,
                          shard_weights=args.shard_weights)


def _generate(args, argv: list[str]) -> int:
    import signal
    import threading

    from .request import check_output_path
    from .video import IMAGE_SUFFIXES, check_crf

    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, argv)
    output = check_output_path(args.output)  # first: a finished video must have somewhere to go
    check_crf(args.crf)
    if output.suffix.lower() in IMAGE_SUFFIXES:  # text-to-image: one frame
        if args.num_frames is None:
            args.num_frames = 1
        elif args.num_frames != 1:
            raise ValueError(f"{output.name} is an image: it holds one frame, not --num-frames {args.num_frames} "
                             "(write .mp4, or give --num-frames 1)")
    try:
        parallel = _parallel(args)
    except RuntimeError as e:
        raise ValueError(str(e)) from e
    coefficients = mode = None
    if args.teacache_coefficients is not None:
        mode, coefficients = _read_coefficients(args.teacache_coefficients)
    req = _request(args, teacache_threshold=args.teacache_threshold, teacache_mode=args.teacache_mode or mode,
                   teacache_coefficients=coefficients)
    on_off = {"auto": None, "on": True, "off": False}
    engine = _engine(args, cfg_batch=on_off[args.cfg_batch], cuda_graphs=on_off[args.cuda_graphs],
                     compile=args.compile, text_encoder_precision=args.text_encoder_precision,
                     text_encoder_device=args.text_encoder_device, offload_text_encoder=args.offload_text_encoder,
                     offload_image_encoder=args.offload_image_encoder, parallel=parallel,
                     **_offload_options(args))
    root = engine.mesh is None or engine.mesh.is_root  # in a parallel run rank 0 alone prints and writes
    for name in _load_loras(engine, args.lora, args.lora_mode, args.lora_high, args.lora_low):
        if root:
            info = engine.loras[name]
            print(f"LoRA {name}: {info['strength']:g} ({info['mode']}, {info['format']}, {info['targets']} layers"
                  + (f", rank {info['rank']})" if info["rank"] else ")"))
    cancel = threading.Event()

    def interrupt(signum, frame):  # first Ctrl-C: stop at the next step; a second one interrupts at once
        cancel.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        video = engine.run(req, cancel=cancel, progress=not args.no_progress and root)
    finally:
        signal.signal(signal.SIGINT, previous)
        if parallel is not None:
            from . import distributed

            distributed.shutdown()
    if not root:
        return 0
    path = _save(video, output, args.crf)
    f, h, w, _ = video.frames.shape
    what = f"{w}x{h} image" if f == 1 and output.suffix.lower() in IMAGE_SUFFIXES else \
        f"{f} frames, {w}x{h}, {video.fps} fps"
    print(f"wrote {path} ({what}), seed {video.seed}")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in video.timings.items())
          + f" (backend {engine.plan.name})")
    if "offload" in video.stats:
        print(f"memory: {video.stats['offload']['plan']}")
    if "parallel" in video.stats:
        print(f"parallel: {video.stats['parallel']['layout']} ({video.stats['parallel']['backend']}), VAE decode on "
              f"{video.stats['parallel'].get('vae_decode')}")
    if "experts" in video.stats:
        ex = video.stats["experts"]
        print(f"experts: high-noise {ex['steps']['high']} steps (guidance {ex['guidance_scale']['high']:g}), "
              f"low-noise {ex['steps']['low']} steps (guidance {ex['guidance_scale']['low']:g}); {ex['placement']}")
    if "teacache" in video.stats:
        tc = video.stats["teacache"]
        per = tc.items() if "experts" not in video.stats else \
            [(f"{e} {b}", c) for e, branches in tc.items() for b, c in branches.items()]
        print("teacache: " + "; ".join(f"{b} computed {c['computed']}, skipped {c['skipped']}" for b, c in per))
    return 0


def _save(video, output, crf: int):
    """Write the MP4 (x264 ``crf``); on Ctrl-C remove the ``.part`` file; if the write fails keep the frames
    (``.npy`` in the temporary directory) and say where, in a GenerationError."""
    import tempfile

    import numpy as np

    from .request import GenerationError

    part = output.with_name(output.name + ".part")
    try:
        return video.save(output, crf=crf)
    except KeyboardInterrupt:
        part.unlink(missing_ok=True)
        raise
    except Exception as e:
        part.unlink(missing_ok=True)
        keep = tempfile.NamedTemporaryFile(prefix="wanrt-frames-", suffix=".npy", delete=False)
        with keep:
            np.save(keep, video.frames)
        raise GenerationError(f"could not write {output} ({type(e).__name__}: {e}); the frames are kept in "
                              f"{keep.name}", video.latents, video.seed, video=video) from e


def _serve(args, argv: list[str]) -> int:
    """``wanrt serve``: one Engine per device (or one parallel Engine over ``--nproc`` ranks: rank 0 serves, the
    others follow), the service until SIGINT/SIGTERM."""
    from pathlib import Path

    try:
        from .serve import ServeConfig, follow, serve
    except ImportError as e:
        raise ValueError(f"wanrt serve needs its extra: pip install 'wanrt[serve]' ({e})") from None

    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, argv)
    try:
        parallel = _parallel(args)
    except RuntimeError as e:
        raise ValueError(str(e)) from e
    if parallel is not None and args.devices:
        raise ValueError("--devices (one Engine per GPU) and a parallel layout (one Engine over all) do not combine")
    devices = [f"cuda:{d.strip()}" for d in args.devices.split(",")] if args.devices else [args.device]
    on_off = {"auto": None, "on": True, "off": False}
    engines = []
    for dev in devices:
        args.device = dev
        engine = _engine(args, cfg_batch=on_off[args.cfg_batch], cuda_graphs=on_off[args.cuda_graphs],
                         compile=args.compile, text_encoder_precision=args.text_encoder_precision,
                         text_encoder_device=args.text_encoder_device, offload_text_encoder=args.offload_text_encoder,
                         offload_image_encoder=args.offload_image_encoder, teacache_threshold=args.teacache_threshold,
                         parallel=parallel, **_offload_options(args))
        _load_loras(engine, args.lora, args.lora_mode, args.lora_high, args.lora_low)
        engines.append(engine)
    broadcast = None
    if parallel is not None:
        import torch.distributed as dist

        from . import distributed

        if dist.get_rank() != 0:  # the followers run what rank 0 takes from the queue
            try:
                follow(engines[0], Path(args.data_dir), warmup=not args.no_warmup)
            finally:
                distributed.shutdown()
            return 0

        def broadcast(params):
            dist.broadcast_object_list([params], src=0)

    config = ServeConfig(Path(args.data_dir), api_key=args.api_key or os.environ.get("WANRT_API_KEY") or None,
                         max_queue=args.max_queue, max_frames=args.max_frames, max_area=args.max_area,
                         max_steps=args.max_steps, grace_s=args.grace_s, cors_origin=args.cors_origin,
                         warmup=not args.no_warmup)
    where = engines[0].mesh.describe() if engines[0].mesh is not None else ", ".join(str(e.device) for e in engines)
    print(f"wanrt serve: {args.model} on {where}, http://{args.host}:{args.port}/"
          + (" (API key required)" if config.api_key else ""), flush=True)
    try:
        serve(engines, config, args.model, host=args.host, port=args.port, broadcast=broadcast)
    finally:
        if parallel is not None:
            from . import distributed

            distributed.shutdown()
    return 0


def _load_loras(engine, specs: list[str], mode: str, high: list[str] = (), low: list[str] = ()) -> list[str]:
    """``--lora FILE[:STRENGTH]`` for each spec (names: the file's stem, made unique), then ``--lora-high`` /
    ``--lora-low`` (A14B: one expert each); returns the names."""
    from pathlib import Path

    names = []
    for expert, spec in [("both", s) for s in specs] + [("high", s) for s in high] + [("low", s) for s in low]:
        path, strength = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                strength = float(tail)
                path = head
            except ValueError:
                pass  # a ':' of the path itself
        stem = name = Path(path).stem
        k = 1
        while name in engine.loras:
            k += 1
            name = f"{stem}_{k}"
        names.append(engine.load_lora(path, strength, name=name, mode=mode, expert=expert))
    return names


def _engine(args, **options):
    from .engine import Engine

    files = {part: getattr(args, part) for part in ("dit", "dit_2", "text_encoder", "vae", "image_encoder",
                                                    "tokenizer") if getattr(args, part, None) is not None}
    if files:
        if args.checkpoint_dir is not None:
            raise ValueError("give --checkpoint-dir or the single files (--dit, --text-encoder, --vae, ...), not both")
        return Engine(args.model, files=files, device=args.device, precision=args.precision, backend=args.backend,
                      **options)
    if args.checkpoint_dir is None:
        return Engine(args.model, device=args.device, precision=args.precision, backend=args.backend, **options)
    return Engine(args.model, args.checkpoint_dir, device=args.device, precision=args.precision,
                  backend=args.backend, **options)


def _read_coefficients(path: str):
    """``(mode, coefficients)`` from a `wanrt calibrate-teacache` JSON file (A14B: ``{"high": ..., "low": ...}``)."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
        raw = data["coefficients"]
        if isinstance(raw, dict):  # A14B: one polynomial per expert
            coefficients = {k: tuple(float(c) for c in raw[k]) for k in ("high", "low")}
        else:
            coefficients = tuple(float(c) for c in raw)
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a TeaCache coefficients file (need a JSON object with a "
                         f"'coefficients' list): {e}") from e
    return data.get("mode"), coefficients


def _calibrate(args) -> int:
    import json
    from pathlib import Path

    sampling = _request(args, teacache_threshold=None)
    engine = _engine(args)
    images = {"image": args.image, "last_image": args.last_image, "max_area": args.max_area}
    if engine.preset.task == "t2v" or (engine.preset.task == "ti2v" and args.image is None):
        images = {}
    elif engine.preset.task == "ti2v":
        images = {"image": args.image, "max_area": args.max_area}
    elif engine.preset.task == "vace":
        images = {"video": args.video, "mask": args.mask, "reference_images": args.reference_image,
                  "conditioning_scale": args.conditioning_scale, "max_area": args.max_area}
    result = engine.calibrate_teacache(
        args.prompt, mode=args.mode, negative_prompt=args.negative_prompt, **images, height=args.height,
        width=args.width,
        num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        shift=args.shift, sample_solver=args.solver, seed=sampling.seed,
        progress=not args.no_progress, **_expert_options(args),
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    def fmt(c) -> str:
        return "[" + ", ".join(f"{v:.6g}" for v in c) + "]"

    coefs, changes = result["coefficients"], result["input_changes"]
    if isinstance(coefs, dict):  # A14B: per expert
        what = "; ".join(f"{k} {fmt(coefs[k])} from {len(changes[k])} steps" for k in ("high", "low"))
        print(f"wrote {out}: mode {result['mode']}, coefficients per expert: {what}")
    else:
        print(f"wrote {out}: mode {result['mode']}, coefficients {fmt(coefs)} from {len(changes)} steps")
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
        from .checkpoints.tiny import default_tiny_checkpoint

        ckpt = default_tiny_checkpoint("tiny")  # the trained model's VAE, as `generate --model tiny` uses
    from .graph.onnx_vae import export_decoder_onnx

    vae = load_vae(ckpt, device=args.device, dtype=torch.float32)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    onnx = export_decoder_onnx(vae, args.output, height=args.height, width=args.width, batch=args.batch, dtype=dtype)
    print(f"wrote {onnx} (+ {onnx.with_suffix('.first.onnx').name}, {onnx.with_suffix('.json').name})")
    if args.format == "tensorrt":
        from .graph.tensorrt_vae import build_decoder_engine

        from .paths import cache_root

        print(f"TensorRT engine: {build_decoder_engine(onnx, cache_root() / 'trt', fp16=args.dtype == 'fp16')}")
    return 0


def _make_tiny(args) -> int:
    from .checkpoints.tiny import write_checkpoint

    out = write_checkpoint(args.dir, layout=args.layout, preset=args.preset, seed=args.seed, shards=args.shards)
    print(f"wrote a random {args.preset} checkpoint in the {args.layout} layout to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wanrt`` command. Returns the exit code (2 for bad arguments or input)."""
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "generate":
            return _generate(args, argv)
        if args.command == "serve":
            return _serve(args, argv)
        commands = {"calibrate-teacache": _calibrate, "export-vae": _export_vae, "make-tiny-checkpoint": _make_tiny}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"wanrt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise  # not one of ours: a bug, keep the traceback
        print(f"wanrt {args.command}: {'cancelled' if code == 130 else 'error'}: {e}", file=sys.stderr)
        return code


def _exit_code(e: Exception) -> int | None:
    """2 for bad input (arguments, files, checkpoints, an unavailable backend), 1 for a failure of ours during
    the run, 130 for a cancelled run; None for anything else (re-raised)."""
    from .checkpoints.io import CheckpointError
    from .ops.backends import BackendUnavailableError
    from .parallel.step import RankFailure
    from .request import Cancelled, GenerationError

    if isinstance(e, Cancelled):
        return 130
    if isinstance(e, (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, CheckpointError,
                      BackendUnavailableError)):
        return 2
    if isinstance(e, (GenerationError, FloatingPointError, RankFailure)):
        return 1
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
