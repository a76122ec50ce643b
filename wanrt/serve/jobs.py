"""Durable job records for ``wanrt serve``: one SQLite table under the data folder.

A job is written (and committed, ``synchronous=FULL``) before its id is returned to the client, so an accepted
job survives a ``kill -9``. On start, :meth:`JobStore.recover` puts back what a stopped server left: queued jobs stay
queued; a job that was running is queued again once (``attempts`` counts the starts), and failed with "interrupted by
a server restart" the second time. Status transitions: ``queued → in_progress → completed | failed | cancelled``
(``queued → cancelled`` too).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")
RESTART_ERROR = "interrupted by a server restart"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    params TEXT NOT NULL,
    model TEXT NOT NULL,
    size TEXT NOT NULL,
    seconds TEXT NOT NULL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    completed_at REAL
)
"""


@dataclass
class Job:
    """One job's record (``params``: the validated request fields, JSON-able; the seed is always set)."""

    id: str
    created_at: float
    status: str
    params: dict
    model: str
    size: str
    seconds: str
    progress: float = 0.0
    error: str | None = None
    attempts: int = 0
    started_at: float | None = None
    completed_at: float | None = None
    seq: int = 0
    extra: dict = field(default_factory=dict)

    def to_api(self) -> dict:
        """The OpenAI-style video object (``object: "video"``), with Wan's own fields beside it."""
        out = {"id": self.id, "object": "video", "status": self.status, "progress": int(round(self.progress)),
               "created_at": int(self.created_at), "completed_at": None if self.completed_at is None
               else int(self.completed_at), "expires_at": None, "model": self.model, "size": self.size,
               "seconds": self.seconds, "prompt": self.params.get("prompt"), "remixed_from_video_id": None,
               "error": None if self.error is None else {"code": "generation_failed" if self.status == "failed"
                                                        else self.status, "message": self.error},
               "num_frames": self.params.get("num_frames"), "seed": self.params.get("seed"),
               "num_inference_steps": self.params.get("num_inference_steps")}
        return out


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs already."""


class JobStore:
    """The jobs of one server (thread-safe; one connection guarded by a lock).

    Args:
        path: the SQLite file (created with its table).
    """

    def __init__(self, path):
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed job survives a power cut, not only a kill -9
        self._db.execute(_SCHEMA)
        self._changed = threading.Condition(self._lock)

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _job(row) -> Job:
        (seq, id_, created, status, progress, params, model, size, seconds, error, attempts, started,
         completed) = row
        return Job(id_, created, status, json.loads(params), model, size, seconds, progress, error, attempts,
                   started, completed, seq)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def list(self, limit: int = 20, after: str | None = None) -> list[Job]:
        """Newest first; ``after``: the id of the last job of the previous page."""
        with self._lock:
            if after is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    return []
                rows = self._db.execute("SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                                        (row[0], limit)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [self._job(r) for r in rows]

    def count(self, status: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | dict(rows)

    # ------------------------------------------------------------------ writing
    def add(self, params: dict, model: str, size: str, seconds: str, max_queue: int | None = None) -> Job:
        """Insert a queued job (a random UUID) and commit it. Raises QueueFull at ``max_queue`` queued jobs."""
        job = Job(f"video_{uuid.uuid4().hex}", time.time(), "queued", params, model, size, seconds)
        with self._lock:
            if max_queue is not None and self.count("queued") >= max_queue:
                raise QueueFull(f"the queue holds {max_queue} jobs")
            self._db.execute("INSERT INTO jobs (id, created_at, status, params, model, size, seconds) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (job.id, job.created_at, job.status,
                                                              json.dumps(params), model, size, seconds))
            job.seq = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (job.id,)).fetchone()[0]
            self._changed.notify_all()
        return job

    def claim(self) -> Job | None:
        """The oldest queued job, now ``in_progress`` (its start counted), or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            job = self._job(row)
            job.status, job.attempts, job.started_at, job.progress = "in_progress", job.attempts + 1, time.time(), 0.0
            self._db.execute("UPDATE jobs SET status = ?, attempts = ?, started_at = ?, progress = 0 WHERE id = ?",
                             (job.status, job.attempts, job.started_at, job.id))
        return job

    def wait_for_work(self, timeout: float) -> None:
        """Block until a job is added (or ``timeout`` seconds)."""
        with self._changed:
            self._changed.wait(timeout)

    def wake(self) -> None:
        """Wake every :meth:`wait_for_work` (the workers are stopping)."""
        with self._changed:
            self._changed.notify_all()

    def progress(self, job_id: str, progress: float) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'",
                             (progress, job_id))

    def finish(self, job_id: str, status: str, error: str | None = None) -> bool:
        """Move a job to a terminal status (False when it already had one)."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status!r}")
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, completed_at = ?, progress = CASE WHEN ? = 'completed' "
                "THEN 100 ELSE progress END WHERE id = ? AND status NOT IN ('completed', 'failed', 'cancelled')",
                (status, error, time.time(), status, job_id))
            return cur.rowcount == 1

    def requeue(self, job_id: str) -> bool:
        """Put a running job back in the queue (a graceful shutdown cancelled it): its start is not counted."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status = 'queued', progress = 0, attempts = MAX(attempts - 1, 0) "
                                   "WHERE id = ? AND status = 'in_progress'", (job_id,))
            return cur.rowcount == 1

    def recover(self) -> tuple[list[str], list[str]]:
        """After a restart: ``(requeued ids, failed ids)`` of the jobs a stopped server was running."""
        with self._lock:
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE status = 'in_progress'").fetchall()
            requeued = [i for i, a in rows if a < 2]
            failed = [i for i, a in rows if a >= 2]
            for i in requeued:
                self._db.execute("UPDATE jobs SET status = 'queued', progress = 0 WHERE id = ?", (i,))
            for i in failed:
                self._db.execute("UPDATE jobs SET status = 'failed', error = ?, completed_at = ? WHERE id = ?",
                                 (RESTART_ERROR, time.time(), i))
        return requeued, failed

    def close(self) -> None:
        with self._lock:
            self._db.close()
