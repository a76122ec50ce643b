"""Multi-GPU layouts of the denoising step: seconds per step, scaling efficiency, bytes communicated, peak memory.

Run under torchrun (every rank runs this script; rank 0 prints and writes the table)::

    torchrun --nproc-per-node 8 benchmarks/bench_parallel.py --model 14b --latent 21 90 160 \\
        --out benchmarks/results/parallel_8xH100_14b_720p.md
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --model 1.3b --latent 21 60 104
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --quick    # CPU, gloo: shows the table works

One guided denoising step (both CFG branches, the step of :mod:`wanrt.parallel.runner`: sequence-parallel DiT,
CFG halves, collectives) on a t2v DiT with seeded random weights (``bench_dit.build_model``; bf16 on CUDA, float32
with ``--quick``), random text embeddings of 512 tokens, per layout:

* ``s/step``: median of ``--steps`` steps after one warm-up step, every rank synchronised (a barrier) before each;
* ``speed-up`` and ``efficiency``: against the same step on one rank alone (rank 0, the others idle), measured in the
  same run: ``t_1 / t_layout`` and ``t_1 / (t_layout * world)``;
* ``MiB sent / step``: what this rank hands to collectives per step, counted at each call (all-to-all: ``(P-1)/P``
  of its input, all-gather: ``(P-1)`` times its input, ring sends, broadcasts and all-reduces as given) — the
  largest over the ranks; beside it the analytic formula of the layout (:func:`analytic_bytes`);
* ``peak MiB / rank``: ``torch.cuda.max_memory_allocated`` (weights included), or the process's peak resident set
  on the CPU — the largest over the ranks.

On the CPU each rank is one process with one thread (torchrun sets ``OMP_NUM_THREADS=1``), so a 2-rank run on 2
cores compares one core with two; more ranks than cores time the oversubscription, not the layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from common import emit, header, vm_hwm_mb

MODELS = {"1.3b": "t2v-1.3b", "14b": "t2v-14b"}


def analytic_bytes(cfg, layout, tokens: int, elsize: int, guided: bool, batch_cfg: bool,
                   sharded_bytes: int = 0) -> float:
    """Bytes one rank hands to collectives per guided step, from the layout alone.

    With ``L`` tokens padded to ``sp`` shards of ``s = ceil(L / sp)``, ``d`` = dim, ``n`` layers, ``b`` samples per
    forward and ``f`` forwards per step (CFG on one rank: 2 forwards of 1, or 1 of 2 batched; CFG parallel: 1 of 1):

    * Ulysses (``U > 1``): q, k, v and the output each cross one all-to-all: ``4 n f (U-1)/U b s d e``;
    * Ring (``R > 1``): K and V of ``U s`` tokens and ``d/U`` channels travel ``R-1`` hops: ``2 n f (R-1) b s d e``;
    * the head's tokens gathered over ``sp`` ranks: ``f (sp-1) b s c 4`` (``c = pt ph pw out_dim``, float32);
    * CFG parallel: the velocity all-gathered over 2 ranks: ``16 F H W 4`` (the latent);
    * sharded weights: every sharded Linear gathered once per forward, this rank's ``1/P`` share sent to the ``P-1``
      others: ``f W (P-1)/P`` for ``W`` = ``sharded_bytes``, the Linears' bytes;
    * plus a few bytes per step for the NaN/cancel agreement (not counted here).
    """
    u, r, sp = layout.ulysses, layout.ring, layout.sp
    s = -(-tokens // sp)
    d, n = cfg.dim, cfg.num_layers
    if layout.cfg == 2 or not guided:
        b, f = 1, 1
    else:
        b, f = (2, 1) if batch_cfg else (1, 2)
    c = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2] * cfg.out_dim
    total = 0.0
    if u > 1:
        total += 4 * n * f * (u - 1) / u * b * s * d * elsize
    if r > 1:
        total += 2 * n * f * (r - 1) * b * s * d * elsize
    if sp > 1:
        total += f * (sp - 1) * b * s * c * 4
    if layout.cfg == 2 and guided:
        total += tokens * c * 4  # the whole velocity, float32
    if layout.shard_weights:
        p = layout.world_size
        total += f * sharded_bytes * (p - 1) / p
    return total


class Counter:
    """Counts the bytes this rank hands to torch.distributed collectives (patched for the duration of ``active``)."""

    NAMES = ("all_to_all_single", "all_gather", "batch_isend_irecv", "broadcast", "all_reduce", "send",
             "all_gather_single", "all_gather_into_tensor")

    def __init__(self):
        self.bytes = 0

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    @contextmanager
    def active(self):
        originals = {name: getattr(dist, name) for name in self.NAMES}

        def a2a(out, inp, *a, group=None, **k):
            p = dist.get_world_size(group)
            self.bytes += self._size(inp) * (p - 1) // p
            return originals["all_to_all_single"](out, inp, *a, group=group, **k)

        def gather(outs, inp, *a, group=None, **k):
            self.bytes += self._size(inp) * (dist.get_world_size(group) - 1)
            return originals["all_gather"](outs, inp, *a, group=group, **k)

        def gather_into(name):
            def wrapped(out, inp, group=None, *a, **k):
                self.bytes += self._size(inp) * (dist.get_world_size(group) - 1)
                return originals[name](out, inp, group, *a, **k)
            return wrapped

        def p2p(ops):
            self.bytes += sum(self._size(op.tensor) for op in ops if op.op in (dist.isend,))
            return originals["batch_isend_irecv"](ops)

        def plain(name):
            def wrapped(t, *a, **k):
                self.bytes += self._size(t)
                return originals[name](t, *a, **k)
            return wrapped

        patched = {"all_to_all_single": a2a, "all_gather": gather, "batch_isend_irecv": p2p,
                   "broadcast": plain("broadcast"), "all_reduce": plain("all_reduce"), "send": plain("send"),
                   "all_gather_single": gather_into("all_gather_single"),  # FSDP2's weight gathers
                   "all_gather_into_tensor": gather_into("all_gather_into_tensor")}
        for name, fn in patched.items():
            setattr(dist, name, fn)
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else vm_hwm_mb()


def _time_steps(step, x, steps: int, device, aligned: bool = True) -> float:
    """Median seconds of ``step(x, t, i)`` over ``steps`` calls after one warm-up (ranks aligned by a barrier before
    each when ``aligned``; the one-rank baseline runs alone)."""
    step(x, 999, 0)
    times = []
    for i in range(steps):
        if aligned:
            dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        step(x, 999 - i, 0)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layouts_for(world: int, heads: int, requested: list[str] | None):
    """The layouts to measure: ``requested`` (``"u2r2c1"``-style, ``s`` suffix for shard_weights), else every valid
    one for ``world`` ranks and ``heads`` heads (with and without CFG parallel), then the most-Ulysses one with
    sharded weights (last: the model stays sharded)."""
    from wanrt.parallel.config import ParallelConfig, _divisors

    if requested:
        out = []
        for text in requested:
            shard = text.endswith("s")
            u, rest = text.rstrip("s")[1:].split("r")
            r, c = rest.split("c")
            out.append(ParallelConfig(ulysses=int(u), ring=int(r), cfg=int(c), shard_weights=shard))
        return out
    out = []
    for cfg in (1, 2):
        if world % cfg:
            continue
        sp = world // cfg
        out += [ParallelConfig(ulysses=u, ring=sp // u, cfg=cfg) for u in _divisors(sp) if heads % u == 0]
    last = max((c for c in out if c.cfg == 1), key=lambda c: c.ulysses)  # the sharded weights last (they stay so)
    return out + [dataclasses.replace(last, shard_weights=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="1.3b")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N blocks")
    ap.add_argument("--latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                    help="latent frames, height, width (default 21 60 104: 480P, 81 frames; --quick: 5 24 40)")
    ap.add_argument("--quick", action="store_true", help="a small model on the CPU (gloo), float32")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per layout (default 3)")
    ap.add_argument("--layouts", nargs="*", default=None,
                    help="e.g. u2r1c1 u1r2c1 u1r1c2 u2r1c1s (s: shard_weights); default every valid layout")
    ap.add_argument("--batch-cfg", action="store_true", help="batch the two CFG branches where they share a rank")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from bench_dit import build_model

    import wanrt
    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import DiTConfig
    from wanrt.parallel.mesh import build_mesh
    from wanrt.parallel.runner import make_step
    from wanrt.presets import get_preset
    from wanrt.sampling.loop import GuidedStep

    rank, world, device = wanrt.distributed.init(timeout_s=600)
    if a.quick:
        cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=4, in_dim=16, out_dim=16, text_dim=256)
        latent, dtype, name = tuple(a.latent or (5, 24, 40)), torch.float32, "quick (dim 256, 4 heads, 4 layers)"
    else:
        cfg = dit_config_for(get_preset(MODELS[a.model]))
        latent, dtype, name = tuple(a.latent or (21, 60, 104)), torch.bfloat16, MODELS[a.model]
    if a.layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=a.layers)
    model = build_model(cfg, str(device), dtype, seed=0)
    model.set_backend("auto")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.out_dim, *latent, generator=g).to(device)
    cond = torch.randn(1, 512, cfg.text_dim, generator=g).to(device, dtype)
    uncond = torch.randn(1, 512, cfg.text_dim, generator=g).to(device, dtype)
    tokens = latent[0] * (latent[1] // cfg.patch_size[1]) * (latent[2] // cfg.patch_size[2])

    # One rank alone: the baseline (the others wait at the barrier).
    t1 = peak1 = None
    if rank == 0:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t1 = _time_steps(GuidedStep(model, cond, uncond, 5.0, batch_cfg=a.batch_cfg), x, a.steps, device, False)
        peak1 = _peak_mib(device)
    dist.barrier()

    rows = []
    for layout in layouts_for(world, cfg.num_heads, a.layouts):
        layout.check(world, cfg.num_heads)
        mesh = build_mesh(layout, cfg.num_heads)
        sharded = 0
        if layout.shard_weights:
            from wanrt.parallel.shard import shard_weights

            sharded = shard_weights(model, mesh, device)["sharded_bytes"] * world
            model.set_backend("auto")
        from wanrt.parallel.dit import SequenceParallelDiT

        dit = SequenceParallelDiT(model, mesh) if mesh.sp > 1 else model
        step, _ = make_step(dit, mesh, cond, uncond, 5.0, batch_cfg=a.batch_cfg and layout.cfg == 1,
                            teacache_config=None, num_steps=a.steps + 1, graphs=None, image_cond={}, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = _time_steps(step, x, a.steps, device)
        counter = Counter()
        with counter.active():
            step(x, 500, 0)
        mine = {"bytes": counter.bytes, "peak": _peak_mib(device), "seconds": seconds}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            worst = max(e["seconds"] for e in everyone)
            elsize = torch.tensor([], dtype=dtype).element_size()
            formula = analytic_bytes(cfg, layout, tokens, elsize, True, a.batch_cfg and layout.cfg == 1, sharded)
            rows.append((layout, worst, max(e["bytes"] for e in everyone), formula, max(e["peak"] for e in everyone)))

    if rank == 0:
        lines = [header(f"bench_parallel: {name}, latent {latent[0]}x{latent[1]}x{latent[2]} ({tokens} tokens), "
                        f"{world} ranks, {dist.get_backend()}", str(device)), "",
                 f"One guided step (CFG scale 5: two branches), {'batched' if a.batch_cfg else 'two passes'} where "
                 f"both branches share a rank; median of {a.steps} steps. 1 rank alone: {t1:.3f} s/step, peak "
                 f"{peak1:.0f} MiB.", "",
                 "| layout | ranks | s/step | speed-up | efficiency | KiB sent / step / rank (counted) | "
                 "KiB (formula) | peak MiB / rank |",
                 "|---|---|---|---|---|---|---|---|"]
        for layout, sec, sent, formula, peak in rows:
            label = f"ulysses {layout.ulysses} x ring {layout.ring} x cfg {layout.cfg}"
            label += " + shard_weights" if layout.shard_weights else ""
            lines.append(f"| {label} | {world} | {sec:.3f} | {t1 / sec:.2f}x | {100 * t1 / (sec * world):.0f}% | "
                         f"{sent / 1024:.1f} | {formula / 1024:.1f} | {peak:.0f} |")
        lines += ["", "Efficiency = t(1 rank) / (t(layout) x ranks). Sent bytes exclude the few bytes of the per-step "
                  "agreement in the formula column."]
        if device.type == "cpu":
            lines.append(f"CPU run: one thread per rank (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}), "
                         f"{os.cpu_count()} cores; the table shows the script works, not GPU scaling.")
        emit(lines, a.out)
    wanrt.distributed.shutdown()


if __name__ == "__main__":
    main()
