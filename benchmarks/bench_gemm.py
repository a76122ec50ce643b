"""Quantized GEMMs: bf16 against fp8 and int8, the kernels alone, the layers of :mod:`wanrt.quant`, a whole DiT.

Two tables.

1. **GEMMs at the DiT's shapes**: ``y [M, N] = x [M, K] · W^T + b`` with M = 32,760 (480x832x81) and 75,600
   (720x1280x81) tokens and (K, N) the projections of the 1.3B model (dim 1536, ffn 8960: q/k/v/o, ffn.0,
   ffn.2) and of the 14B model (dim 5120, ffn 13824). Rows per shape:

   * ``bf16 F.linear``: the reference;
   * ``fp8 _scaled_mm alone``: ``torch._scaled_mm`` on activations quantized beforehand (per-token scales,
     per-channel weight scales, bias, bf16 out): the GEMM's own speed;
   * ``FP8Linear``: the layer end to end, per-token activation quantization included;
   * ``int8 _int_mm alone``: ``torch._int_mm`` (int32 out) on activations quantized beforehand; its error is
     taken after the rescale ``· s_x · s_w + b`` (not timed);
   * ``Int8Linear``: end to end (activation quantization, ``_int_mm``, rescale, bias);
   * ``Int8WeightOnlyLinear``: int8 weights cast to bf16 per call, bf16 GEMM, column scales;
   * with ``wanrt.kernels.quant`` importable (and CUDA, or ``--interpret``): FP8Linear and Int8Linear with
     ``act_backend="triton"`` (the fused activation-quantization kernel; the int8 rescale kernel too).

   FLOPs = 2·M·K·N (the bias is not counted); for int8 they are integer operations (TOPS). % of peak against
   the dense tensor-core peak of the row's input type: bf16 (and int8 weight-only, a bf16 GEMM) 989, fp8 and
   int8 1979 on H100/H200 (``--peak-bf16``, ``--peak-8bit``; the 8-bit default is twice the bf16 one). Times are
   ``triton.testing.do_bench`` medians (L2 flushed before every run) after a warm-up call on CUDA,
   ``time.perf_counter`` medians on the CPU. The error is ``‖y − y_ref‖ / ‖y_ref‖`` against an fp32 matmul
   (TF32 off) of the same unquantized bf16 inputs, over a random subsample of ``--err-rows`` rows, once per
   shape. Inputs: x ~ N(0, 1), W ~ N(0, 1/K), b ~ N(0, 0.02²), all bf16 (Gaussian activations without the
   outlier channels of real ones: the errors are a floor, not what a real checkpoint sees).

2. **Whole-DiT forward per precision**: the t2v DiT of :mod:`benchmarks.bench_dit` (1.3B, or ``--model 14b``
   with ``--layers N``), built on meta, materialised on the device with seeded random bf16 weights, then
   ``quantize_(model, QuantConfig(scheme))`` (the blocks' attention and FFN Linears); one 480P forward (latent
   16x21x60x104, 32,760 tokens, batch 1, no CFG) with the attention backend of ``--backend`` (default
   ``auto``). Each precision rebuilds the same weights (same seed), so the bf16 model is never held twice.
   Columns: ms per forward (median of ``--repeats`` after one warm-up), speedup vs bf16, weight memory
   (:func:`wanrt.quant.weight_bytes`), peak memory, and the velocity's ``‖v − v_bf16‖ / ‖v_bf16‖``.

A row that raises (an unsupported kernel configuration, out of memory) is reported as failed, and the run goes on.

``--quick``: tiny shapes on the CPU (M 64, (K, N) (64, 48) and (128, 256); a 2-block dim-64 DiT in bf16), the
same rows (``_scaled_mm`` and ``_int_mm`` run on the CPU build of torch): a smoke test, not a measurement.

    python benchmarks/bench_gemm.py --quick
    python benchmarks/bench_gemm.py --device cuda --out benchmarks/results/gemm_H100.md
    python benchmarks/bench_gemm.py --device cuda --parts dit --model 14b --layers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from common import default_peak, emit, header, settle_device_args, time_ms, vm_hwm_mb
from torch import nn

BF16 = torch.bfloat16
REAL_M = (32_760, 75_600)
REAL_KN = ((1536, 1536), (1536, 8960), (8960, 1536), (5120, 5120), (5120, 13824), (13824, 5120))
QUICK_M = (64,)
QUICK_KN = ((64, 48), (128, 256))


@dataclass(frozen=True)
class Case:
    """One row: ``run()`` is what is timed; ``result()`` gives the output ``[M, N]`` the error is taken from."""

    kernel: str
    peak: str  # "bf16" or "8bit": which tensor-core peak the row is compared with
    run: Callable[[], object]
    result: Callable[[], torch.Tensor] | None = None


def triton_quant_status(device: str, interpret: bool) -> str | None:
    """None when the fused activation-quantization kernels can run here, else why not (for the caption)."""
    if not (device.startswith("cuda") or interpret):
        return "needs CUDA, or --interpret on the CPU"
    try:
        importlib.import_module("wanrt.kernels.quant")
    except Exception as e:  # noqa: BLE001 - not written yet, or broken: reported in the caption
        return f"wanrt.kernels.quant does not import ({type(e).__name__}: {e})"
    return None


def make_cases(m: int, k: int, n: int, device: str, triton_ok: bool, seed: int = 0):
    """Inputs of one shape (drawn once, on ``device``) and the rows that use them."""
    from wanrt.quant import FP8_DTYPE, FP8Linear, Int8Linear, Int8WeightOnlyLinear, quantize_per_token

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g).to(BF16)  # [M, K]
    linear = nn.Linear(k, n, device="meta")
    linear.weight = nn.Parameter(torch.randn(n, k, device=device, generator=g).div_(math.sqrt(k)).to(BF16),
                                 requires_grad=False)  # [N, K]
    linear.bias = nn.Parameter(torch.randn(n, device=device, generator=g).mul_(0.02).to(BF16), requires_grad=False)
    w, b = linear.weight, linear.bias

    fp8 = FP8Linear.from_linear(linear)
    int8 = Int8Linear.from_linear(linear)
    int8_wo = Int8WeightOnlyLinear.from_linear(linear)
    xq8, xs8 = quantize_per_token(x, FP8_DTYPE)  # [M, K] fp8, [M, 1] float32
    xqi, xsi = quantize_per_token(x, torch.int8)

    def scaled_mm():
        return torch._scaled_mm(xq8, fp8.weight.t(), scale_a=xs8, scale_b=fp8.weight_scale[None, :], bias=fp8.bias,
                                out_dtype=BF16)

    def int_mm():
        return torch._int_mm(xqi, int8.weight.t())  # [M, N] int32

    def int_mm_rescaled():
        return (int_mm().float() * xsi * int8.weight_scale[None, :] + int8.bias.float()).to(BF16)

    cases = [
        Case("bf16 F.linear (reference)", "bf16", lambda: F.linear(x, w, b)),
        Case("fp8 _scaled_mm alone", "8bit", scaled_mm),
        Case("FP8Linear (act. quant eager)", "8bit", lambda: fp8(x)),
        Case("int8 _int_mm alone", "8bit", int_mm, int_mm_rescaled),
        Case("Int8Linear (act. quant eager)", "8bit", lambda: int8(x)),
        Case("Int8WeightOnlyLinear", "bf16", lambda: int8_wo(x)),
    ]
    if triton_ok:
        fp8_t = FP8Linear.from_linear(linear, act_backend="triton")
        int8_t = Int8Linear.from_linear(linear, act_backend="triton")
        cases.insert(3, Case("FP8Linear (act. quant triton)", "8bit", lambda: fp8_t(x)))
        cases.insert(6, Case("Int8Linear (act. quant + rescale triton)", "8bit", lambda: int8_t(x)))
    return x, w, b, cases


def _fmt(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _failed(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"failed: {type(e).__name__}: {msg[:100]}".replace("|", "/")


def gemm_rows(a, peaks: dict[str, float | None], triton_ok: bool) -> list[str]:
    dev = a.device
    cuda = dev.startswith("cuda")
    shapes = [(m, k, n) for m in (QUICK_M if a.quick else REAL_M) for k, n in (QUICK_KN if a.quick else REAL_KN)]
    rows = []
    for m, k, n in shapes:
        label = f"M {m}, K {k}, N {n}"
        flops = 2.0 * m * k * n
        try:
            x, w, b, cases = make_cases(m, k, n, dev, triton_ok)
        except Exception as e:  # noqa: BLE001 - a failed row is a result too, reported in the table
            rows.append(f"| {label} | inputs | {_failed(e)} | – | – | – | – |")
            continue
        g = torch.Generator(device="cpu").manual_seed(1)
        idx = torch.randperm(m, generator=g)[: min(m, a.err_rows)].sort().values.to(dev)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = torch.addmm(b.float(), x[idx].float(), w.float().t())  # [rows, N] fp32 reference
        torch.backends.cuda.matmul.allow_tf32 = tf32
        bf16_ms = None
        for c in cases:
            try:
                with torch.no_grad():
                    out = (c.result or c.run)()[idx].float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    del out
                    ms = time_ms(c.run, dev, rep_ms=a.rep_ms, cpu_reps=a.repeats)
            except Exception as e:  # noqa: BLE001 - reported in the table (unsupported config, out of memory)
                rows.append(f"| {label} | {c.kernel} | {_failed(e)} | – | – | – | – |")
                if cuda:
                    torch.cuda.empty_cache()
                continue
            if bf16_ms is None and c.peak == "bf16":
                bf16_ms = ms
            tflops = flops / ms / 1e9
            peak = peaks[c.peak]
            cells = [label, c.kernel, f"{ms:.3f}", _fmt(tflops), f"{100 * tflops / peak:.1f}%" if peak else "–",
                     f"{bf16_ms / ms:.2f}x" if bf16_ms else "–", f"{err:.1e}"]
            rows.append("| " + " | ".join(cells) + " |")
        del x, w, b, cases, ref
        if cuda:
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ whole DiT


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dit_rows(a, triton_ok: bool) -> tuple[list[str], str]:
    """Rows of the whole-DiT table and its caption."""
    from bench_dit import MODELS, build_model

    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import DiTConfig
    from wanrt.presets import get_preset
    from wanrt.quant import QuantConfig, quantize_, weight_bytes

    dev = a.device
    cuda = dev.startswith("cuda")
    if a.quick:
        cfg = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=64)
        latent, name = (3, 8, 8), "tiny (dim 64, 2 heads)"
    else:
        cfg = dit_config_for(get_preset(MODELS[a.model]))
        latent, name = tuple(a.latent), MODELS[a.model]
    if a.layers is not None:
        if not 0 < a.layers <= cfg.num_layers:
            raise SystemExit(f"--layers must be in 1..{cfg.num_layers}")
        cfg = dataclasses.replace(cfg, num_layers=a.layers)

    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, cfg.in_dim, *latent, device=dev, generator=g)  # [1, 16, F, H, W]
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, generator=g)  # [1, 512, text_dim]
    t = torch.tensor([500], device=dev)

    precisions = [("bf16", None, "eager"), ("fp8", "fp8", "eager"), ("int8", "int8", "eager"),
                  ("int8-wo", "int8-wo", "eager")]
    if triton_ok:
        precisions[2:2] = [("fp8, triton act. quant", "fp8", "triton")]
        precisions[4:4] = [("int8, triton act. quant + rescale", "int8", "triton")]
    rows, ref, bf16_ms, plan_name = [], None, None, None
    for label, scheme, act in precisions:
        model = None
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = build_model(cfg, dev, BF16, seed=0)
            if scheme is not None:
                quantize_(model, QuantConfig(scheme, act_backend=act))
            plan = model.set_backend(a.backend, quant=act)  # the plan sets every 8-bit Linear's act. quant.
            plan_name = plan_name or f"attention {plan.attention}, fused ops {plan.fused}"
            wgib = weight_bytes(model) / 2**30
            with torch.no_grad():
                out = model(x, t, ctx)  # warm-up (Triton compilation and autotuning on the first row)
                if ref is None:
                    if scheme is not None:
                        raise RuntimeError("the bf16 reference forward did not run")
                    ref, err = out, 0.0
                else:
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                del out
                times = []
                for _ in range(a.repeats):
                    _sync(dev)
                    t0 = time.perf_counter()
                    model(x, t, ctx)
                    _sync(dev)
                    times.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # noqa: BLE001 - reported in the table (unsupported config, out of memory)
            rows.append(f"| {label} | {_failed(e)} | – | – | – | – |")
            del model
            continue
        ms = statistics.median(times)
        bf16_ms = bf16_ms or (ms if scheme is None else None)
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else vm_hwm_mb() / 1024
        cells = [label, f"{ms:.1f}", f"{bf16_ms / ms:.2f}x" if bf16_ms else "–", f"{wgib:.3g}", f"{mem:.2f}",
                 f"{err:.1e}"]
        rows.append("| " + " | ".join(cells) + " |")
        del model

    n_tok = math.prod(s // p for s, p in zip(latent, cfg.patch_size, strict=True))
    mem_note = "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (VmHWM, cumulative)"
    caption = (f"{name} DiT, {cfg.num_layers} blocks (dim {cfg.dim}, ffn {cfg.ffn_dim}), random bf16 weights "
               f"(+ float32 keep_fp32), quantize_ on the blocks' attention and FFN Linears; {plan_name}. One forward: "
               f"latent 1x{cfg.in_dim}x{'x'.join(map(str, latent))} = {n_tok} tokens, {cfg.text_len} text tokens, "
               f"batch 1, no CFG; median of {a.repeats} after one warm-up. Weight memory: weight_bytes (all "
               f"parameters and buffers); peak memory: {mem_note}.")
    return rows, caption


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and a tiny DiT on the CPU (smoke test)")
    ap.add_argument("--interpret", action="store_true",
                    help="with --quick: run the Triton activation-quantization rows in the CPU interpreter")
    ap.add_argument("--parts", nargs="+", choices=("gemm", "dit"), default=["gemm", "dit"])
    ap.add_argument("--rep-ms", type=float, default=50.0, help="do_bench measuring time per GEMM row (CUDA)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per GEMM row on the CPU (default 5) and timed forwards per DiT row (default 2)")
    ap.add_argument("--err-rows", type=int, default=4096, help="rows of the subsample the GEMM error is taken on")
    ap.add_argument("--model", choices=("1.3b", "14b"), default="1.3b")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (default: all)")
    ap.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("F", "H", "W"),
                    help="latent frames, height, width (default 21 60 104 = 480x832x81)")
    ap.add_argument("--backend", default="auto", help="attention backend of the DiT forwards (default auto)")
    ap.add_argument("--peak-bf16", type=float, default=None,
                    help="bf16 dense peak, TFLOP/s (default: H100/H200 989, A100 312, else none)")
    ap.add_argument("--peak-8bit", type=float, default=None,
                    help="fp8 / int8 dense peak, TFLOP/s or TOPS (default: twice the bf16 peak)")
    ap.add_argument("--out", default=None, help="write the markdown tables here too")
    a = ap.parse_args()
    settle_device_args(ap, a, "the real shapes")
    dev = a.device

    peak16 = a.peak_bf16 if a.peak_bf16 is not None else default_peak(dev)
    peak8 = a.peak_8bit if a.peak_8bit is not None else (2 * peak16 if peak16 else None)
    peaks = {"bf16": peak16, "8bit": peak8}
    why_not_triton = triton_quant_status(dev, a.interpret)
    triton_ok = why_not_triton is None
    triton_note = ("Activation quantization: eager and the Triton kernels of wanrt.kernels.quant"
                   + (" (in the CPU interpreter)." if a.interpret else ".") if triton_ok else
                   f"Activation quantization: eager only (Triton rows not run: {why_not_triton}).")

    repeats = a.repeats
    lines = [header("bench_gemm", dev)]
    if "gemm" in a.parts:
        a.repeats = repeats or 5
        rows = gemm_rows(a, peaks, triton_ok)
        timing = ("triton.testing.do_bench medians (L2 flushed) after a warm-up call" if dev.startswith("cuda")
                  else f"time.perf_counter medians of {a.repeats} after a warm-up call")
        peak_note = (f"% of peak against {peak16:.0f} TFLOP/s (bf16, int8 weight-only) and {peak8:.0f} (fp8, int8)"
                     if peak16 and peak8 else "% of peak: no peak known for this device")
        lines += [
            "",
            "### GEMMs: y [M, N] = x [M, K] · W^T + b",
            "",
            (f"x, W, b bf16 (x ~ N(0, 1), W ~ N(0, 1/K)), output bf16, per-token activation and per-channel weight "
            f"scales; {timing}. FLOPs = 2·M·K·N (TOPS for int8); {peak_note}. Rel. error: ‖y − y_ref‖ / ‖y_ref‖ "
            f"against an fp32 matmul (TF32 off) of the unquantized inputs, on {a.err_rows} random rows (all rows "
            f"when M is smaller). 'alone' rows time the GEMM on activations quantized beforehand. {triton_note}"),
            "",
            "| shape | kernel | ms | TFLOP/s | % of peak | speedup vs bf16 | rel. error vs fp32 |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    if "dit" in a.parts:
        a.repeats = repeats or 2
        rows, caption = dit_rows(a, triton_ok)
        lines += [
            "",
            "### Whole DiT forward per precision",
            "",
            caption + " " + triton_note,
            "",
            "| precision | ms per forward | speedup vs bf16 | weight memory GiB | peak memory GiB | rel. err vs bf16 |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
