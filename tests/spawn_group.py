"""Spawned gloo process groups on 127.0.0.1 for the tests of wanrt.parallel.

:func:`spawn` runs ``body(rank, world)`` on ``world`` ranks (``torch.multiprocessing`` spawn, one thread each); each
rank reports its outcome through a queue, and the first failure, a rank that dies, or the deadline terminates every
rank, so a failing or stuck rank fails the test instead of hanging it. Collectives time out after ``timeout_s``.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp

from wanrt.parallel import init

GROUP_DEADLINE_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, body, results, timeout_s=30.0, backend="gloo"):
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        got_rank, got_world, device = init(timeout_s=timeout_s, backend=backend)
        assert (got_rank, got_world, device.type) == (rank, world, "cpu" if backend == "gloo" else "cuda")
        notes = body(rank, world)
        results.put((rank, None, notes))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, traceback.format_exc(), None))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def spawn(world, body, deadline_s=GROUP_DEADLINE_S, timeout_s=30.0, expect_exit=(), backend="gloo"):
    """Run ``body(rank, world)`` on ``world`` gloo ranks; return ``{rank: (error, notes)}`` (error None on success).

    Stops at the first error or the deadline, terminating every rank still running. Ranks in ``expect_exit`` may
    exit without reporting (their outcome is then ``(None, {"exitcode": code})``). Collectives time out after
    ``timeout_s`` seconds. ``backend="nccl"`` puts rank r on ``cuda:r``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, body, results, timeout_s, backend), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    outcome = {}
    end = time.monotonic() + deadline_s
    try:
        while len(outcome) < world:
            left = end - time.monotonic()
            if left <= 0:
                for r in range(world):
                    outcome.setdefault(r, (f"rank {r}: no result within {deadline_s} s", None))
                break
            try:
                rank, err, notes = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcome]
                for r in dead:
                    if r in expect_exit:  # a rank the test makes exit on purpose
                        outcome[r] = (None, {"exitcode": procs[r].exitcode})
                    else:
                        outcome[r] = (f"rank {r} died with exit code {procs[r].exitcode}", None)
                if any(r not in expect_exit for r in dead):
                    break
                continue
            outcome[rank] = (err, notes)
            if err is not None:
                break
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(outcome) == world and all(e is None for e, _ in outcome.values()) else 0.1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
    return outcome


def assert_group_ok(outcome, world):
    errors = {r: e for r, (e, _) in outcome.items() if e is not None}
    assert not errors, "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
    assert sorted(outcome) == list(range(world))


