"""``wanrt serve`` under load: throughput and latency at 1, 4 and 16 concurrent clients, and the server's overhead
per job against calling ``Engine.generate`` (+ writing the MP4) in-process with the same request.

The server runs as a subprocess on a loopback port (``python -m wanrt serve``); each client posts a job and waits
for it on its event stream (``/v1/videos/{id}/events``), so latency is post → completed as a client sees it.
Target: overhead <= 50 ms per job on the tiny model.

    python benchmarks/bench_serve.py                       # CPU, the tiny model at 16x16, 1 frame, 1 step
    python benchmarks/bench_serve.py --device cuda --size 832x480 --frames 17 --steps 4
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import emit, header


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def run_level(url: str, body: dict, clients: int, jobs: int) -> tuple[float, list[float]]:
    """``jobs`` jobs from ``clients`` threads: ``(wall seconds, latencies)``."""
    import httpx

    latencies, lock = [], threading.Lock()
    todo = iter(range(jobs))

    def client():
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    k = next(todo, None)
                if k is None:
                    return
                t0 = time.perf_counter()
                while True:
                    r = http.post("/v1/videos", json={**body, "seed": k})
                    if r.status_code != 429:
                        break
                    time.sleep(0.02)
                r.raise_for_status()
                job = r.json()["id"]
                with http.stream("GET", f"/v1/videos/{job}/events") as s:
                    for line in s.iter_lines():
                        if line.startswith("data:") and '"status": "completed"' in line:
                            break
                with lock:
                    latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies


def direct_seconds(a, body: dict, jobs: int) -> float:
    """Median seconds of ``Engine.generate`` + ``Video.save`` in-process (the server's own work per job)."""
    import wanrt

    w, h = (int(v) for v in body["size"].split("x"))
    eng = wanrt.Engine(a.model, device=a.device, precision=a.precision)
    kw = dict(height=h, width=w, num_frames=body["num_frames"], num_inference_steps=body["num_inference_steps"],
              progress=False)
    times = []
    with tempfile.TemporaryDirectory() as d:
        for k in range(jobs + 1):
            t0 = time.perf_counter()
            eng.generate(body["prompt"], seed=k, **kw).save(f"{d}/v.mp4")
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--size", default="16x16")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=48, help="jobs per concurrency level")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    body = {"prompt": "a corgi surfing a wave", "size": a.size, "num_frames": a.frames, "num_inference_steps": a.steps}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen([sys.executable, "-m", "wanrt", "serve", "--model", a.model, "--device", a.device,
                                 "--precision", a.precision, "--port", str(port), "--data-dir", data,
                                 "--max-queue", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import httpx

            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            run_level(url, body, 1, 3)  # warm: the prompt cache, the first MP4
            rows, single = [], None
            for clients in (1, 4, 16):
                wall, lat = run_level(url, body, clients, a.jobs)
                single = single if single is not None else statistics.median(lat)
                rows.append(f"| {clients} | {a.jobs} | {60 * a.jobs / wall:.0f} | {_pct(lat, 0.5) * 1e3:.0f} | "
                            f"{_pct(lat, 0.9) * 1e3:.0f} | {_pct(lat, 0.99) * 1e3:.0f} |")
        finally:
            proc.terminate()
            proc.wait(60)
    direct = direct_seconds(a, body, 10)
    lines = [header("bench_serve", a.device), "",
             f"{a.model}, {a.size}, {a.frames} frames, {a.steps} steps; latency = post to completed, seen on the "
             "job's event stream.", "",
             "| clients | jobs | jobs / min | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|", *rows, "",
             "| per job | ms |", "|---|---|",
             f"| `Engine.generate` + MP4 in-process (median) | {direct * 1e3:.0f} |",
             f"| through the server, 1 client (median) | {single * 1e3:.0f} |",
             f"| server overhead | {(single - direct) * 1e3:.0f} |"]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
