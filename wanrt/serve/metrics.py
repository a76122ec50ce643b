"""Prometheus metrics of ``wanrt serve`` (``prometheus_client``, one registry per server): queue depth, jobs by
status, step and job latency histograms, and GPU memory where there is CUDA."""

from __future__ import annotations


class Metrics:
    """The server's collectors, in their own registry (several apps in one process do not collide)."""

    def __init__(self, service):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.jobs = Counter("wanrt_jobs", "Jobs reaching each status", ["status"], registry=self.registry)
        self.queue = Gauge("wanrt_queue_depth", "Jobs waiting in the queue", registry=self.registry)
        self.queue.set_function(lambda: service.store.count("queued"))
        self.running = Gauge("wanrt_jobs_running", "Jobs running now", registry=self.registry)
        self.running.set_function(lambda: len(service.workers.running))
        self.step_seconds = Histogram("wanrt_step_seconds", "Seconds per denoising step", registry=self.registry,
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.job_seconds = Histogram("wanrt_job_seconds", "Seconds per job, start to end", registry=self.registry,
                                     buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800))
        import torch

        if torch.cuda.is_available():
            gpu = Gauge("wanrt_gpu_memory_bytes", "Allocated GPU memory", ["device"], registry=self.registry)
            for k in range(torch.cuda.device_count()):
                gpu.labels(device=str(k)).set_function(lambda k=k: torch.cuda.memory_allocated(k))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
