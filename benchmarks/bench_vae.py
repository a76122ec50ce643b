"""Wan2.1 VAE decode per backend: seconds, peak memory and error of decoding one 81-frame video.

Builds the real Wan2.1 VAE architecture (``VAEConfig()``: base_dim 96, 127M parameters) on the meta
device, materialises it on the device in float32 (as the official code runs it; ``--dtype bf16``
for bf16) and fills it with seeded random weights drawn on the device (the scheme of
``wanrt.checkpoints.tiny.randomize_``). Then decodes random normalized latents ``[1, 16, 21, h, w]``
(81 frames) at 480x832 and 720x1280, one table per size, one row per way of decoding:

* ``eager``: ``WanVAE.decode`` (cat + pad + ``nn.Conv3d`` per causal conv: the official numerics),
  the reference of the error column;
* ``triton``: the same with ``CausalConv3d.backend = "triton"`` on every causal conv
  (``wanrt/kernels/causal_conv3d.py``: an implicit GEMM reading the cache prefix in place);
* ``eager streaming`` / ``triton streaming``: ``WanVAE.decode_stream``, each chunk of frames dropped
  as it comes, so memory holds one latent frame's activations and the causal cache, not the video;
* ``tiled``: ``wanrt.models.vae_tiling.decode_tiled`` with ``TilingConfig(32, 8)`` (it changes the
  result by design: a tile sees only part of the receptive field);
* ``onnxruntime``: ``wanrt.graph.onnx_vae.export_decoder_onnx`` then ``OnnxDecoder`` (CUDA EP on a
  GPU, CPU EP with ``--quick``); ``tensorrt``: ``build_decoder_engine`` (FP16 mode, norms in fp32) and
  ``TensorRTDecoder``; both float32 exports only;
* ``diffusers``: ``AutoencoderKLWan`` with the same weights (renamed with
  ``wanrt.checkpoints.keymap_vae``, shared, not copied), decoding ``latents * std + mean``.

Rows whose module or package is missing are listed as not available. Times are medians of
``--repeats`` decodes after one untimed decode (Triton compilation and autotuning, onnxruntime and
TensorRT warm-up), which also gives the error ``‖out − out_eager‖ / ‖out_eager‖`` over the whole
clamped video (computed on the host). Peak memory: CUDA ``torch.cuda.max_memory_allocated`` reset per
row (weights, latents and the returned video included); for onnxruntime/TensorRT, whose memory is
outside PyTorch's allocator, the growth of the device's used memory (``cudaMemGetInfo``) over the
row is added to it (marked ≈). CPU: the process's peak resident set (VmHWM, reset per row through
``/proc/self/clear_refs``; it includes the weights, the reference video and the libraries).

Targets (H100, docs/model-reference.md §11.5): 81x480x832 in <= 2 s, 81x720x1280 in <= 4.5 s, peak <= 6 GB.

``--quick``: a tiny VAE (base_dim 8) on the CPU at 64x96, 9 frames (3 latent frames), tiles of 6
latent pixels with overlap 2 (so that tiling tiles); ~25 s on 2 cores. ``--interpret`` adds the Triton
rows in Triton's CPU interpreter, which needs ~20 s per decode even at 16x16: its defaults are then
16x16, 5 frames, 1 timed decode (one tile: the tiled row equals the untiled decode there).

    python benchmarks/bench_vae.py --quick
    python benchmarks/bench_vae.py --device cuda --repeats 1 --out benchmarks/results/vae_H100.md
    python benchmarks/bench_vae.py --device cuda --sizes 720x1280 --rows eager,triton-stream --dtype bf16
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from common import emit, header, settle_device_args, vm_hwm_mb

ROWS = ("eager", "triton", "eager-stream", "triton-stream", "tiled", "onnxruntime", "tensorrt", "diffusers")
LABELS = {
    "eager": "eager (decode)",
    "triton": "triton causal conv3d (decode)",
    "eager-stream": "eager streaming (decode_stream, frames dropped)",
    "triton-stream": "triton streaming (decode_stream, frames dropped)",
    "tiled": "tiled (decode_tiled, {tile})",
    "onnxruntime": "onnxruntime ({ep})",
    "tensorrt": "tensorrt ({precision})",
    "diffusers": "diffusers AutoencoderKLWan",
}
#: H100 targets per (frames, height, width): seconds; and the peak memory target in bytes (6 GB).
TARGET_S = {(81, 480, 832): 2.0, (81, 720, 1280): 4.5}
TARGET_PEAK_BYTES = 6e9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def _init_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights drawn on the parameters' device, in their dtype.

    The scheme of :func:`wanrt.checkpoints.tiny.randomize_` for the VAE (which draws on the host):
    RMSNorm gammas ``1 + N(0, 0.1²)``, biases ``N(0, 0.02²)``, conv weights ``N(0, 1/fan_in)``.
    """
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":
                p.normal_(1.0, 0.1, generator=g)
            elif leaf == "bias":
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(max(1, p.shape[1:].numel())), generator=g)


def build_vae(cfg, device: str, dtype: torch.dtype, seed: int = 0):
    """``WanVAE(cfg)`` built on the meta device, materialised on ``device`` in ``dtype``, random weights."""
    from wanrt.models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(cfg).to(dtype)  # still meta: no memory
    vae.to_empty(device=device)
    _init_(vae, seed)
    return vae.eval().requires_grad_(False)


def set_conv_backend(vae, backend: str) -> None:
    """``CausalConv3d.backend = backend`` on every causal conv of ``vae`` (encoder, decoder, conv1/conv2)."""
    from wanrt.models.vae import CausalConv3d

    for m in vae.modules():
        if isinstance(m, CausalConv3d):
            m.backend = backend


def decode_tflop(cfg, latent_shape: tuple[int, ...]) -> float | None:
    """TFLOP of one untiled ``WanVAE.decode`` (``torch.utils.flop_counter`` on the meta device), or None."""
    from torch.utils.flop_counter import FlopCounterMode

    from wanrt.models.vae import WanVAE

    try:
        with torch.device("meta"):
            vae = WanVAE(cfg)
        counter = FlopCounterMode(display=False)
        with counter:
            vae.decode(torch.empty(latent_shape, device="meta"))
        return counter.get_total_flops() / 1e12
    except Exception:  # noqa: BLE001 - an estimate for the caption only
        return None


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _release(dev: str) -> None:
    """Free what the previous row left: Python garbage, PyTorch's cached blocks, glibc's free heap."""
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_HWM_RESETS = True


def _reset_peak(dev: str) -> None:
    global _HWM_RESETS
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        _HWM_RESETS = False


def _outside_torch_bytes(dev: str) -> int:
    """Device memory in use that PyTorch's caching allocator does not hold (``cudaMemGetInfo`` − reserved)."""
    if not dev.startswith("cuda"):
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def _peak_gib(dev: str) -> float:
    return (torch.cuda.max_memory_allocated() if dev.startswith("cuda") else vm_hwm_mb() * 2**20) / 2**30


class _ErrorMeter:
    """``‖out − ref‖ / ‖ref‖`` accumulated chunk by chunk in float64 on the host (ref: the eager video)."""

    def __init__(self, ref: torch.Tensor | None) -> None:
        self.ref, self.pos, self.num, self.den = ref, 0, 0.0, 0.0

    def add(self, chunk: torch.Tensor) -> torch.Tensor:
        """Adds the next frames; returns them as a float32 host tensor."""
        c = chunk.detach().to("cpu", torch.float32)
        if self.ref is None:
            return c
        for i in range(c.shape[2]):  # frame by frame: no video-sized temporary
            r = self.ref[:, :, self.pos + i]
            self.num += float((c[:, :, i] - r).double().pow(2).sum())
            self.den += float(r.double().pow(2).sum())
        self.pos += c.shape[2]
        return c

    def value(self) -> float | None:
        if self.ref is None:
            return None
        if self.pos != self.ref.shape[2]:
            raise RuntimeError(f"decoded {self.pos} frames, the reference has {self.ref.shape[2]}")
        return math.sqrt(self.num / self.den) if self.den else 0.0


@dataclass
class Result:
    key: str
    label: str
    seconds: float | None = None
    peak_gib: float | None = None
    approx_peak: bool = False
    err: float | None = None
    status: str = ""  # "not available", "out of memory", "failed (see notes)" when there is no time
    note: str = ""  # why, or what the row's setup cost


@dataclass
class Plan:
    """One row: ``run()`` decodes and returns an iterable of frame chunks (one chunk: the whole video)."""

    key: str
    label: str
    run: Callable[[], Iterable[torch.Tensor]]
    cleanup: Callable[[], None] = lambda: None
    external_memory: bool = False  # memory outside PyTorch's allocator (onnxruntime, TensorRT)
    note: str = ""


def measure(plan: Plan, dev: str, ref: torch.Tensor | None, repeats: int, *, outside0: int = 0,
            keep_output: bool = False) -> tuple[Result, torch.Tensor | None]:
    """Untimed decode (warm-up; error vs ``ref``), then ``repeats`` timed ones; peak memory over all.

    ``outside0``: :func:`_outside_torch_bytes` before the row's setup (onnxruntime sessions, TensorRT
    contexts); what the row holds outside PyTorch at the end is added to its peak. With ``keep_output``
    also returns the decoded video on the host (float32; the eager reference).
    """
    res = Result(plan.key, plan.label, note=plan.note, approx_peak=plan.external_memory and dev.startswith("cuda"))
    _release(dev)
    _reset_peak(dev)
    meter, kept = _ErrorMeter(ref), []
    for chunk in plan.run():
        host = meter.add(chunk)
        if keep_output:
            kept.append(host)
        del chunk, host
    res.err = meter.value()
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        for chunk in plan.run():
            del chunk  # dropped as they come (a full decode returns one chunk: the whole video)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    res.seconds = statistics.median(times) if times else None
    res.peak_gib = _peak_gib(dev)
    if plan.external_memory:
        res.peak_gib += max(0, _outside_torch_bytes(dev) - outside0) / 2**30
    out = torch.cat(kept, dim=2) if keep_output else None
    return res, out


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------


def _one(fn: Callable[[], torch.Tensor]) -> Callable[[], Iterator[torch.Tensor]]:
    def run() -> Iterator[torch.Tensor]:
        yield fn()

    return run


def make_plan(key: str, vae, lat: torch.Tensor, a, height: int, width: int) -> Plan | str:
    """The :class:`Plan` of row ``key``, or a string saying why it is not available here."""
    triton_ok = a.device.startswith("cuda") or a.interpret
    if key in ("eager", "eager-stream", "triton", "triton-stream"):
        backend = key.split("-")[0]
        if backend == "triton" and not triton_ok:
            return "needs CUDA, or --interpret on the CPU"
        if backend == "triton":
            try:
                import wanrt.kernels.causal_conv3d  # noqa: F401
            except ImportError as e:
                return f"not available ({e})"

        def run_decode():
            set_conv_backend(vae, backend)
            return [vae.decode(lat)]

        def run_stream():
            set_conv_backend(vae, backend)
            return vae.decode_stream(lat)

        return Plan(key, LABELS[key], run_stream if key.endswith("-stream") else run_decode,
                    cleanup=lambda: set_conv_backend(vae, "eager"))
    if key == "tiled":
        try:
            from wanrt.models.vae_tiling import TilingConfig, decode_tiled
        except ImportError as e:
            return f"not available (wanrt.models.vae_tiling: {e})"
        tc = TilingConfig(tile_latent=a.tile[0], overlap_latent=a.tile[1])
        label = LABELS[key].format(tile=f"tiles {tc.tile_latent}, overlap {tc.overlap_latent} latent px")
        return Plan(key, label, _one(lambda: decode_tiled(vae, lat, tc)),
                    note="differs from the untiled decode by design (a tile sees part of the receptive field and "
                         "of the middle attention; random weights exaggerate it)")
    if key in ("onnxruntime", "tensorrt"):
        return _graph_plan(key, vae, lat, a, height, width)
    if key == "diffusers":
        return _diffusers_plan(vae, lat)
    raise ValueError(key)


def _export(vae, a, height: int, width: int) -> tuple[Path, float]:
    from wanrt.graph.onnx_vae import export_decoder_onnx

    path = Path(a.build_dir) / f"vae_decoder_{vae.config.base_dim}_{height}x{width}_fp32.onnx"
    t0 = time.perf_counter()
    export_decoder_onnx(vae, path, height=height, width=width)
    return path, time.perf_counter() - t0


def _graph_plan(key: str, vae, lat: torch.Tensor, a, height: int, width: int) -> Plan | str:
    dev = a.device
    if vae.dtype != torch.float32:
        return "float32 only here (run without --dtype bf16)"
    try:
        from wanrt.graph.onnx_vae import OnnxDecoder
    except ImportError as e:
        return f"not available (wanrt.graph.onnx_vae: {e})"
    if key == "onnxruntime":
        try:
            import onnx  # noqa: F401
            import onnxruntime as ort
        except ImportError as e:
            return f"not available ({e.name or e} not installed: pip install onnx onnxruntime-gpu)"
        cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
        if dev.startswith("cuda") and not cuda_ep:
            return "onnxruntime has no CUDAExecutionProvider here (the CPU EP would take many minutes)"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if dev.startswith("cuda") else \
            ["CPUExecutionProvider"]
        path, export_s = _export(vae, a, height, width)
        dec = OnnxDecoder(path, providers=providers)
        label = LABELS[key].format(ep=dec.providers[0].replace("ExecutionProvider", " EP"))
        return Plan(key, label, _one(lambda: dec.decode(lat)), external_memory=True,
                    note=f"ONNX export {export_s:.0f} s")
    try:
        from wanrt.graph.tensorrt_vae import TensorRTDecoder, build_decoder_engine
    except ImportError as e:
        return f"not available (wanrt.graph.tensorrt_vae: {e})"
    if not dev.startswith("cuda"):
        return "needs CUDA"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "not available (tensorrt not installed: pip install 'wanrt[trt]')"
    path, export_s = _export(vae, a, height, width)
    t0 = time.perf_counter()
    engine = build_decoder_engine(path, cache_dir=Path(a.build_dir) / "trt")
    build_s = time.perf_counter() - t0
    dec = TensorRTDecoder(engine)
    precision = dec.info.get("engine", {}).get("precision", "?")
    return Plan(key, LABELS[key].format(precision=precision), _one(lambda: dec.decode(lat)), external_memory=True,
                note=f"ONNX export {export_s:.0f} s, engine build {build_s:.0f} s (reused when cached)")


def _diffusers_plan(vae, lat: torch.Tensor) -> Plan | str:
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as e:
        return f"not available (diffusers: {e})"
    from wanrt.checkpoints.keymap_vae import vae_state_dict_from_official

    cfg = vae.config
    with torch.device("meta"):
        ref = AutoencoderKLWan(**cfg.to_diffusers_config())
    # Same tensors as ours (assign=True shares them): no second copy of the weights.
    ref.load_state_dict(vae_state_dict_from_official(vae.state_dict(), config=cfg), strict=True, assign=True)
    ref = ref.eval().requires_grad_(False)
    ref.disable_tiling()
    ref.disable_slicing()

    @torch.no_grad()
    def run() -> torch.Tensor:
        z = vae.denormalize_latents(lat).to(vae.dtype)  # diffusers decodes un-normalized latents
        return ref.decode(z).sample

    return Plan("diffusers", LABELS["diffusers"], _one(run))


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 480x832, got {s!r}") from e
    return h, w


def _fmt_s(s: float | None) -> str:
    return "–" if s is None else (f"{s:.2f}" if s >= 0.1 else f"{s:.3g}")


def run_size(vae, a, frames: int, height: int, width: int) -> tuple[list[str], list[str]]:
    """The table lines of one video size, and the notes of its rows."""
    dev, cfg = a.device, vae.config
    s, tf = cfg.spatial_factor, cfg.temporal_factor
    latent = (1, cfg.z_dim, 1 + (frames - 1) // tf, height // s, width // s)
    g = torch.Generator(device=dev).manual_seed(1)
    lat = torch.randn(latent, device=dev, generator=g)  # [1, 16, 21, h, w] normalized latents
    results: list[Result] = []
    notes: list[str] = []
    ref: torch.Tensor | None = None
    for key in ["eager"] + [k for k in a.rows if k != "eager"]:  # eager always, first: the reference
        plan: Plan | str | None = None
        outside0 = _outside_torch_bytes(dev)  # after the previous row's _release
        try:
            plan = make_plan(key, vae, lat, a, height, width)
            if isinstance(plan, str):
                res = Result(key, LABELS[key].split(" (")[0], note=plan, status="not available")
            else:
                res, out = measure(plan, dev, ref, a.repeats, outside0=outside0, keep_output=key == "eager")
                if key == "eager":
                    ref = out
        except torch.cuda.OutOfMemoryError:
            res = Result(key, plan.label if isinstance(plan, Plan) else key, status="out of memory")
        except Exception as e:  # noqa: BLE001 - one failing row must not take the table
            msg = " ".join(str(e).split())[:300]
            res = Result(key, plan.label if isinstance(plan, Plan) else key, note=f"{type(e).__name__}: {msg}",
                         status="failed (see notes)")
        finally:
            if isinstance(plan, Plan):
                plan.cleanup()
            plan = None
            _release(dev)
        results.append(res)

    target_s = TARGET_S.get((frames, height, width))
    rows, within = [], []
    for r in results:
        if r.note:
            notes.append(f"{r.label}: {r.note}")
        if r.seconds is None:
            cells = [r.label, "–", "–", r.status or "–"]
        else:
            mem = "–" if r.peak_gib is None else ("≈" if r.approx_peak else "") + f"{r.peak_gib:.2f}"
            err = "reference" if r.key == "eager" else ("–" if r.err is None else f"{r.err:.1e}")
            cells = [r.label, _fmt_s(r.seconds), mem, err]
            if target_s and r.peak_gib is not None and r.seconds <= target_s \
                    and r.peak_gib * 2**30 <= TARGET_PEAK_BYTES:
                within.append(r.label)
        rows.append("| " + " | ".join(cells) + " |")

    tflop = decode_tflop(cfg, latent)
    clamped = f"{100 * (ref.abs() >= 1).float().mean().item():.0f}%" if ref is not None else "–"
    target = (f"target on an H100: <= {target_s:g} s and peak <= 6 GB ({TARGET_PEAK_BYTES / 2**30:.2f} GiB)"
              if target_s else "no published target for this size")
    lines = [
        f"**{frames}x{height}x{width}** (latents {'x'.join(map(str, latent))}"
        + (f"; {tflop:.0f} TFLOP per untiled decode" if tflop and tflop >= 1 else
           f"; {tflop * 1e3:.3g} GFLOP per untiled decode" if tflop else "")
        + f"; {clamped} of the eager video's values clamped at ±1). {target[0].upper() + target[1:]}"
        + (f"; rows within it here: {', '.join(within) or 'none'}." if target_s and dev.startswith("cuda") else "."),
        "",
        "| config | seconds | peak memory GiB | rel. error vs eager |",
        "|---|---|---|---|",
        *rows,
    ]
    return lines, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny VAE (base_dim 8), 64x96, 9 frames, on the CPU")
    ap.add_argument("--interpret", action="store_true",
                    help="with --quick: also run the Triton rows in the CPU interpreter (slow: 16x16, 5 frames, "
                         "1 repeat by default, ~2 min on 2 cores)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="VAE weights and compute (fp32: official)")
    ap.add_argument("--sizes", type=_size, nargs="+", default=None, metavar="HxW",
                    help="video sizes (default 480x832 720x1280; --quick: 64x96; --interpret: 16x16)")
    ap.add_argument("--frames", type=int, default=None,
                    help="video frames, 1 + 4k (default 81; --quick: 9; --interpret: 5)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows out of {','.join(ROWS)}")
    ap.add_argument("--tile", type=int, nargs=2, default=None, metavar=("TILE", "OVERLAP"),
                    help="tiled row's tile and overlap in latent pixels (default 32 8; --quick: 6 2)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed decodes per row, after one untimed decode (default 2; --interpret: 1)")
    ap.add_argument("--build-dir", default="build/bench_vae", help="where ONNX exports and TensorRT engines go")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    a = ap.parse_args()
    settle_device_args(ap, a, "the real VAE sizes")
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    if bad := [r for r in a.rows if r not in ROWS]:
        ap.error(f"unknown rows {bad}; choose from {','.join(ROWS)}")
    a.repeats = a.repeats if a.repeats is not None else (1 if a.interpret else 2)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")

    from wanrt.models.vae import VAEConfig

    cfg = VAEConfig(base_dim=8) if a.quick else VAEConfig()
    # The interpreter takes ~20 s per tiny-VAE decode at 16x16 (5 frames), ~1 min at 32x32, far more at 64x96.
    a.sizes = a.sizes or ([(16, 16)] if a.interpret else [(64, 96)] if a.quick else [(480, 832), (720, 1280)])
    frames = a.frames or (5 if a.interpret else 9 if a.quick else 81)
    a.tile = a.tile or ([6, 2] if a.quick else [32, 8])
    if (frames - 1) % cfg.temporal_factor:
        ap.error(f"--frames must be 1 + {cfg.temporal_factor}k")
    for h, w in a.sizes:
        if h % cfg.spatial_factor or w % cfg.spatial_factor:
            ap.error(f"sizes must be multiples of {cfg.spatial_factor}, got {h}x{w}")
    dev, dtype = a.device, DTYPES[a.dtype]

    t0 = time.perf_counter()
    vae = build_vae(cfg, dev, dtype)
    _sync(dev)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in vae.parameters())
    weight_gib = sum(p.numel() * p.element_size() for p in vae.parameters()) / 2**30

    if dev.startswith("cuda"):
        mem_note = ("torch.cuda.max_memory_allocated reset per row (weights, latents and the returned video included; "
                    "≈: plus the device memory onnxruntime/TensorRT hold outside PyTorch at the end of the row)")
        tf32 = (f"cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'} for the fp32 eager convolutions "
                "(PyTorch's default, as the official code runs); the Triton kernel uses IEEE fp32 dots in fp32")
    else:
        mem_note = ("process peak resident set (VmHWM, reset per row; weights, reference video and libraries "
                    "included)")
        tf32 = "CPU times are a smoke test"
    name = "tiny (base_dim 8)" if a.quick else "Wan2.1 (base_dim 96)"
    out = [
        header("bench_vae", dev),
        "",
        f"{name} VAE decode, {n_params / 1e6:,.1f}M parameters (encoder included), {weight_gib:.3g} GiB of "
        f"{str(dtype).replace('torch.', '')} weights, random, built on meta and materialised on {dev} in "
        f"{build_s:.1f} s; random normalized latents, batch 1. Seconds: median of {a.repeats} decodes after "
        f"one untimed decode; peak memory: {mem_note}; rel. error: ‖out − eager‖ / ‖eager‖ over the clamped "
        f"video. {tf32}. Targets (H100): 81x480x832 <= 2 s, 81x720x1280 <= 4.5 s, peak <= 6 GB."
        + (" Triton ran in the CPU interpreter." if a.interpret else ""),
    ]
    notes: list[str] = []
    for h, w in a.sizes:
        lines, size_notes = run_size(vae, a, frames, h, w)
        out += ["", *lines]
        notes += [f"{frames}x{h}x{w}, {n}" for n in size_notes]
        if a.out:  # what is done so far, in case a later size runs out of time
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text("\n".join(out) + "\n")
    if not _HWM_RESETS:
        notes.append("/proc/self/clear_refs was not writable: the CPU peaks are cumulative over the rows")
    if notes:
        out += ["", "Notes: " + "; ".join(notes) + "."]
    emit(out, a.out)


if __name__ == "__main__":
    main()
