"""The workers of ``wanrt serve``: one thread per Engine, each taking the oldest queued job from the one store.

A job's request is resolved again from its stored fields (the same :meth:`wanrt.Engine.request` that validated it
when it was posted), run with a step callback that records progress (the store, the live state the event stream
reads, the metrics) and with the job's cancel Event, and its MP4 written under a temporary name and renamed when
complete (``Mp4Writer``), so a half-written file is never served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import JobStore

log = logging.getLogger("wanrt.serve")
LIVE_KEPT = 256  # jobs whose step state is kept for event streams


@dataclass
class Live:
    """What the event stream reads of a running job: the last finished step and its timing."""

    step: int = -1
    num_steps: int = 0
    started: float = field(default_factory=time.monotonic)
    status: str = "queued"

    def event(self) -> dict:
        elapsed = time.monotonic() - self.started
        done = self.step + 1
        eta = (elapsed / done) * (self.num_steps - done) if done > 0 else None
        return {"step": done, "num_steps": self.num_steps, "elapsed_s": round(elapsed, 3),
                "eta_s": None if eta is None else round(eta, 3)}


def request_of(engine, params: dict, data_dir: Path):
    """The Engine request of a job's stored fields (images from ``data_dir/inputs``)."""
    kw = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt", "image", "last_image")}
    for key in ("image", "last_image"):
        if params.get(key):
            kw[key] = str(Path(data_dir) / "inputs" / params[key])
    return engine.request(params.get("prompt"), params.get("negative_prompt"), **kw)


class Workers:
    """The worker threads and the per-job state they share with the HTTP side.

    Args:
        engines: one :class:`wanrt.Engine` per worker (one per GPU).
        store: the :class:`JobStore`. data_dir: where ``videos/`` and ``inputs/`` live.
        build_request: ``build_request(engine, params, data_dir) -> Request`` (:func:`request_of`).
        metrics: the app's :class:`~wanrt.serve.metrics.Metrics`, or None.
        broadcast: for one parallel Engine over several ranks (this is rank 0): ``broadcast(params)`` hands each job
            to the other ranks (:func:`follow`) before it runs, ``broadcast(None)`` releases them at shutdown.
    """

    def __init__(self, engines, store: JobStore, data_dir: Path, build_request, metrics=None, broadcast=None):
        self.engines, self.store, self.data_dir = list(engines), store, Path(data_dir)
        self.build_request, self.metrics, self.broadcast = build_request, metrics, broadcast
        self.cancels: dict[str, threading.Event] = {}
        self.live: OrderedDict[str, Live] = OrderedDict()  # running and recently finished jobs (bounded)
        self.running: dict[str, int] = {}  # job id -> worker index
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.ready = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self, warmup: bool = True) -> None:
        """Warm up every Engine (in their threads), then start taking jobs; ``ready`` is set when all are warm."""
        warm = [threading.Event() for _ in self.engines]
        for k, engine in enumerate(self.engines):
            t = threading.Thread(target=self._loop, args=(k, engine, warm[k], warmup), name=f"wanrt-worker-{k}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

        def all_ready():
            for w in warm:
                w.wait()
            self.ready.set()

        threading.Thread(target=all_ready, daemon=True).start()

    def stop(self, grace_s: float) -> None:
        """Stop taking jobs; let the running ones finish within ``grace_s`` seconds, then cancel them."""
        self._stop.set()
        self.store.wake()
        deadline = time.monotonic() + grace_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for job_id in list(self.running):
                self.cancels[job_id].set()
        for t in self._threads:
            t.join(30.0)
        if self.broadcast is not None:
            self.broadcast(None)  # the other ranks' follow() returns

    def video_path(self, job_id: str) -> Path:
        return self.data_dir / "videos" / f"{job_id}.mp4"

    # ------------------------------------------------------------------ cancellation
    def cancel(self, job_id: str) -> str:
        """Cancel a job: a queued one at once, a running one at its next step boundary. Returns its status after."""
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.status == "queued" and self.store.finish(job_id, "cancelled", "cancelled by the client"):
            self._count("cancelled")
            return "cancelled"
        with self._lock:
            ev = self.cancels.get(job_id)
        if ev is not None:
            ev.set()
        return self.store.get(job_id).status

    # ------------------------------------------------------------------ the loop
    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.jobs.labels(status=status).inc()

    def _loop(self, k: int, engine, warm: threading.Event, warmup: bool) -> None:
        try:
            if warmup:
                engine.warmup()
        except Exception:  # a failed warm-up is logged; the first job pays for it instead
            log.exception("warm-up of worker %d failed", k)
        finally:
            warm.set()
        while not self._stop.is_set():
            job = self.store.claim()
            if job is None:
                self.store.wait_for_work(0.5)
                continue
            self._run(k, engine, job)

    def _run(self, k: int, engine, job) -> None:
        from ..request import Cancelled

        cancel = threading.Event()
        live = Live(status="in_progress")
        with self._lock:
            self.cancels[job.id], self.live[job.id], self.running[job.id] = cancel, live, k
            while len(self.live) > LIVE_KEPT:  # the oldest finished ones go (their final status is in the store)
                self.live.popitem(last=False)
        t0 = time.monotonic()
        last = [t0]

        def callback(i, n, _latents):
            now = time.monotonic()
            live.step, live.num_steps = i, n
            if self.metrics is not None:
                self.metrics.step_seconds.observe(now - last[0])
            last[0] = now
            self.store.progress(job.id, 100.0 * (i + 1) / n * 0.95)  # the decode is the last 5 %

        try:
            req = self.build_request(engine, job.params, self.data_dir)
            live.num_steps = req.num_inference_steps
            if self.broadcast is not None:  # every rank of the parallel Engine runs the same request
                self.broadcast(job.params)
            video = engine.run(req, callback=callback, cancel=cancel, progress=False)
            path = self.video_path(job.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            video.save(path)  # written as .part and renamed
            if not self.store.finish(job.id, "completed"):  # deleted meanwhile: drop the file
                path.unlink(missing_ok=True)
            status = "completed"
        except Cancelled:
            if self._stop.is_set() and self.store.requeue(job.id):  # shut down mid-run: it runs again on restart
                status = "queued"
            else:
                status = "cancelled"
                self.store.finish(job.id, "cancelled", "cancelled by the client")
        except Exception as e:  # the job failed; the server goes on
            log.exception("job %s failed", job.id)
            status = "failed"
            self.store.finish(job.id, "failed", f"{type(e).__name__}: {e}")
        live.status = status
        if status != "queued":
            self._count(status)
        if self.metrics is not None:
            self.metrics.job_seconds.observe(time.monotonic() - t0)
        with self._lock:
            self.cancels.pop(job.id, None)
            self.running.pop(job.id, None)


def follow(engine, data_dir: Path, warmup: bool = True) -> int:
    """The ranks other than 0 of a parallel Engine: run each job rank 0 broadcasts (:class:`Workers` with
    ``broadcast``), in step with it, until it broadcasts None. Returns the number of jobs run.

    Cancellation and NaN checks are agreed between the ranks at every step by the Engine itself; rank 0 alone
    writes the video.
    """
    import torch.distributed as dist

    from ..request import Cancelled

    if warmup:
        engine.warmup()
    runs = 0
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is None:
            return runs
        try:
            engine.run(request_of(engine, msg[0], Path(data_dir)), progress=False)
        except Cancelled:
            pass
        except Exception:  # rank 0 fails the job and says why; this rank waits for the next one
            log.exception("a job failed on this rank")
        runs += 1
