"""The HTTP side of ``wanrt serve``: OpenAI's videos API (``/v1/videos``) with Wan's own fields, live progress as
Server-Sent Events, health, Prometheus metrics and a small web page.

Every endpoint but ``/health`` and the page ``/`` (static, no data) needs ``Authorization: Bearer KEY`` when the
server has a key (compared in constant time). Job ids are random UUIDs; files are named from them, never from user
input. Requests are validated by the same :meth:`wanrt.Engine.request` the Engine runs, before they are queued.
"""


import asyncio
import hmac
import io
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .jobs import TERMINAL, JobStore, QueueFull
from .worker import Workers, request_of

log = logging.getLogger("wanrt.serve")
FPS = 16
#: fields a client may send, besides the image uploads (``input_reference``, ``last_reference``)
FIELDS = ("model", "prompt", "size", "seconds", "num_frames", "negative_prompt", "seed", "num_inference_steps",
          "guidance_scale", "shift", "sample_solver", "teacache_threshold", "loras", "timesteps", "guidance_scale_2",
          "boundary")


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings (``wanrt serve`` flags).

    Attributes:
        data_dir: the job database, uploaded images (``inputs/``) and videos (``videos/``).
        api_key: required as ``Authorization: Bearer KEY`` when set.
        max_queue: queued jobs at most (a full queue answers 429 with ``Retry-After``).
        max_frames, max_area (pixels), max_steps: per-request limits (400 beyond them; None: none).
        max_upload_bytes, max_image_pixels: limits of an uploaded image.
        grace_s: on shutdown, how long a running job may take to finish before it is cancelled (and re-queued).
        cors_origin: an origin allowed by CORS (off when None).
        warmup: warm the Engines up before ``/health`` says ready.
    """

    data_dir: Path
    api_key: str | None = None
    max_queue: int = 32
    max_frames: int | None = None
    max_area: int | None = None
    max_steps: int | None = None
    max_upload_bytes: int = 20 << 20
    max_image_pixels: int = 4096 * 4096
    grace_s: float = 30.0
    cors_origin: str | None = None
    warmup: bool = True


class BadField(ValueError):
    """A request field the server refuses: answered 400 with the field's name."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


def _frames_of_seconds(seconds, fps: int = FPS) -> int:
    """The 4k+1 frame count nearest ``seconds`` at ``fps`` (the model's: 16, 24 for Wan2.2 TI2V; at least 1)."""
    s = float(seconds)
    if not math.isfinite(s) or s <= 0:
        raise BadField("seconds", f"seconds must be a positive number, got {seconds!r}")
    return 4 * max(0, round(s * fps / 4)) + 1


def _size(size) -> tuple[int, int]:
    """``"832x480"`` -> ``(width, height)``."""
    try:
        w, h = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise BadField("size", f"size must be WIDTHxHEIGHT, e.g. \"832x480\", got {size!r}") from None
    return w, h


def _param_of(message: str) -> str | None:
    """The request field a validation message is about (its first field name), for the error's ``param``."""
    names = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale_2", "guidance_scale", "shift",
             "sample_solver", "seed", "teacache", "loras", "timesteps", "prompt", "negative_prompt", "image",
             "last_image", "boundary")
    hits = [(message.find(n), n) for n in names if n in message]
    if not hits:
        return None
    name = min(hits)[1]
    return {"height": "size", "width": "size", "image": "input_reference", "last_image": "last_reference",
            "teacache": "teacache_threshold"}.get(name, name)


class Service:
    """The state behind the app: config, engines, store, workers, metrics, draining flag.

    ``engines``: one per GPU (each a worker on the one queue), or the rank-0 Engine of one parallel layout with
    ``broadcast`` (see :class:`~wanrt.serve.worker.Workers`; the other ranks run :func:`~wanrt.serve.worker.follow`).
    """

    def __init__(self, engines, config: ServeConfig, model_name: str, broadcast=None):
        self.config, self.engines, self.model_name = config, list(engines), model_name
        config.data_dir.mkdir(parents=True, exist_ok=True)
        (config.data_dir / "inputs").mkdir(exist_ok=True)
        (config.data_dir / "videos").mkdir(exist_ok=True)
        self.store = JobStore(config.data_dir / "jobs.sqlite3")
        from .metrics import Metrics

        self.metrics = Metrics(self)
        self.workers = Workers(self.engines, self.store, config.data_dir, request_of, self.metrics, broadcast)
        self.draining = False
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        requeued, failed = self.store.recover()
        if requeued or failed:
            log.info("restart: %d jobs re-queued, %d failed (interrupted twice)", len(requeued), len(failed))
        self.workers.start(self.config.warmup)
        self.started = True

    def stop(self) -> None:
        self.draining = True
        if self.started:
            self.workers.stop(self.config.grace_s)
        self.store.close()

    # ------------------------------------------------------------------ a new job
    def validate(self, fields: dict, uploads: dict[str, bytes]) -> dict:
        """The stored fields of a valid request (seed drawn, images saved under random names). Raises BadField."""
        c = self.config
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise BadField(unknown[0], f"unknown field {unknown[0]!r}; accepted: {', '.join(FIELDS)}")
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadField("prompt", "prompt must be a non-empty string")
        model = fields.get("model")
        if model not in (None, "", self.model_name):
            raise BadField("model", f"this server runs {self.model_name!r}, not {model!r}")
        params: dict = {"prompt": prompt}
        for key in ("negative_prompt", "seed", "num_inference_steps", "guidance_scale", "shift", "sample_solver",
                    "teacache_threshold", "loras", "timesteps", "guidance_scale_2", "boundary"):
            if fields.get(key) is not None:
                params[key] = fields[key]
        for key in ("seed", "num_inference_steps"):
            if key in params:
                params[key] = _int(key, params[key])
        for key in ("guidance_scale", "shift", "teacache_threshold", "guidance_scale_2", "boundary"):
            if key in params:
                params[key] = _float(key, params[key])
        if "loras" in params and isinstance(params["loras"], str):
            try:
                params["loras"] = json.loads(params["loras"])
            except ValueError:
                raise BadField("loras", "loras must be a JSON object {name: strength}") from None
        if fields.get("size") is not None:
            params["width"], params["height"] = _size(fields["size"])
        if fields.get("num_frames") is not None and fields.get("seconds") is not None:
            raise BadField("seconds", "give seconds or num_frames, not both")
        if fields.get("num_frames") is not None:
            params["num_frames"] = _int("num_frames", fields["num_frames"])
        elif fields.get("seconds") is not None:
            params["num_frames"] = _frames_of_seconds(fields["seconds"], self.engines[0].preset.fps)
        preset = self.engines[0].preset
        frames = params.get("num_frames", preset.num_frames)
        area = params.get("width", preset.width) * params.get("height", preset.height)
        steps = params.get("num_inference_steps", preset.num_inference_steps)
        for name, value, limit in (("num_frames", frames, c.max_frames), ("size", area, c.max_area),
                                   ("num_inference_steps", steps, c.max_steps)):
            if limit is not None and value > limit:
                what = "pixels" if name == "size" else name
                raise BadField("seconds" if name == "num_frames" and "seconds" in fields else name,
                               f"{name}: {value} {what} is over this server's limit of {limit}")
        for field, key in (("input_reference", "image"), ("last_reference", "last_image")):
            if field in uploads:
                params[key] = self._save_image(field, uploads[field])
        try:
            req = request_of(self.engines[0], params, c.data_dir)  # as the worker will build it
        except (ValueError, TypeError, KeyError) as e:
            for key in ("image", "last_image"):
                if key in params:
                    (c.data_dir / "inputs" / params[key]).unlink(missing_ok=True)
            raise BadField(_param_of(str(e)), str(e)) from None
        params.update(seed=req.seed, num_frames=req.num_frames, width=req.width, height=req.height,
                      num_inference_steps=req.num_inference_steps)
        return params

    def _save_image(self, field: str, data: bytes) -> str:
        c = self.config
        if len(data) > c.max_upload_bytes:
            raise BadField(field, f"{field}: {len(data)} bytes is over this server's limit of {c.max_upload_bytes}")
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                w, h = im.size
                fmt = (im.format or "png").lower()
        except Exception:
            raise BadField(field, f"{field} is not an image this server can read") from None
        if w * h > c.max_image_pixels:
            raise BadField(field, f"{field}: {w}x{h} pixels is over this server's limit of {c.max_image_pixels}")
        name = f"{uuid.uuid4().hex}.{'jpg' if fmt == 'jpeg' else fmt}"
        (c.data_dir / "inputs" / name).write_bytes(data)
        return name


def _int(name, v) -> int:
    if isinstance(v, bool):
        raise BadField(name, f"{name} must be an integer, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise BadField(name, f"{name} must be an integer, got {v!r}") from None
    if not f.is_integer():
        raise BadField(name, f"{name} must be an integer, got {v!r}")
    return int(f)


def _float(name, v) -> float:
    if isinstance(v, bool):
        raise BadField(name, f"{name} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise BadField(name, f"{name} must be a number, got {v!r}") from None


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def create_app(service: Service):
    """The FastAPI app of ``service`` (starts the workers on startup, drains them on shutdown)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="wanrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    cfg = service.config
    if cfg.cors_origin:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[cfg.cors_origin], allow_methods=["*"],
                           allow_headers=["*"])

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if cfg.api_key and request.url.path not in ("/health", "/") and request.method != "OPTIONS":  # (preflight)
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                return _error(401, "a valid API key is needed: Authorization: Bearer KEY", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    def health():
        state = "draining" if service.draining else ("ready" if service.workers.ready.is_set() else "loading")
        return JSONResponse({"status": state, "model": service.model_name, "workers": len(service.engines),
                             "queued": service.store.count("queued")}, status_code=200 if state == "ready" else 503)

    @app.get("/metrics")
    def metrics():
        body, ctype = service.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse((Path(__file__).parent / "static" / "index.html").read_text())

    @app.post("/v1/videos")
    async def create(request: Request):
        if service.draining:
            return _error(503, "the server is shutting down", kind="server_error", headers={"Retry-After": "30"})
        ctype = request.headers.get("content-type", "")
        uploads: dict[str, bytes] = {}
        try:
            if ctype.startswith("multipart/form-data"):
                form = await request.form()
                fields = {}
                for key, value in form.multi_items():
                    if hasattr(value, "read"):
                        uploads[key] = await value.read()
                    else:
                        fields[key] = value
                bad = sorted(set(uploads) - {"input_reference", "last_reference"})
                if bad:
                    raise BadField(bad[0], f"unknown file field {bad[0]!r}")
            else:
                fields = await request.json()
                if not isinstance(fields, dict):
                    raise BadField(None, "the body must be a JSON object")
            params = await asyncio.to_thread(service.validate, fields, uploads)
        except BadField as e:
            return _error(400, str(e), e.param)
        except ValueError as e:  # a body that is not JSON
            return _error(400, f"the body is not valid JSON: {e}")
        seconds = f"{params['num_frames'] / service.engines[0].preset.fps:g}"
        try:
            job = service.store.add(params, service.model_name, f"{params['width']}x{params['height']}", seconds,
                                    max_queue=cfg.max_queue)
        except QueueFull as e:
            for key in ("image", "last_image"):
                if key in params:
                    (cfg.data_dir / "inputs" / params[key]).unlink(missing_ok=True)
            return _error(429, f"{e}; try again later", kind="rate_limit_error", headers={"Retry-After": "10"})
        service.metrics.jobs.labels(status="queued").inc()
        return job.to_api()

    def _get(video_id: str):
        job = service.store.get(video_id)
        if job is None:
            return None, _error(404, f"no video {video_id!r}", "video_id")
        return job, None

    @app.get("/v1/videos")
    def list_videos(limit: int = 20, after: str | None = None):
        limit = max(1, min(100, limit))
        jobs = service.store.list(limit + 1, after)
        data = [j.to_api() for j in jobs[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}

    @app.get("/v1/videos/{video_id}")
    def retrieve(video_id: str):
        job, err = _get(video_id)
        return err or job.to_api()

    @app.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        job, err = _get(video_id)
        if err:
            return err
        status = await asyncio.to_thread(service.workers.cancel, video_id)
        if status == "in_progress":  # stops at its next step boundary; the file, if any, is never kept
            for _ in range(600):
                await asyncio.sleep(0.05)
                status = service.store.get(video_id).status
                if status in TERMINAL:
                    break
        service.workers.video_path(video_id).unlink(missing_ok=True)
        for key in ("image", "last_image"):  # its uploads (stored under random names)
            if job.params.get(key):
                (cfg.data_dir / "inputs" / job.params[key]).unlink(missing_ok=True)
        return {"id": video_id, "object": "video.deleted", "deleted": True, "status": status}

    @app.get("/v1/videos/{video_id}/content")
    def content(video_id: str):
        job, err = _get(video_id)
        if err:
            return err
        path = service.workers.video_path(video_id)
        if job.status != "completed" or not path.is_file():
            return _error(404, f"video {video_id!r} has no content (status {job.status})", "video_id")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.get("/v1/videos/{video_id}/events")
    async def events(video_id: str, request: Request):
        job, err = _get(video_id)
        if err:
            return err

        async def stream():
            sent = -1
            deadline = time.monotonic() + 24 * 3600
            while time.monotonic() < deadline:
                if await request.is_disconnected():
                    return
                job = service.store.get(video_id)
                live = service.workers.live.get(video_id)
                if live is not None and live.step + 1 > sent and live.step >= 0:
                    sent = live.step + 1
                    yield f"event: step\ndata: {json.dumps(live.event())}\n\n"
                if job is None or job.status in TERMINAL:
                    yield f"event: status\ndata: {json.dumps(job.to_api() if job else {'id': video_id})}\n\n"
                    return
                await asyncio.sleep(0.01)  # a step is 10s of ms on the tiny model, seconds on real ones

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
