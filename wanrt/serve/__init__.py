"""``wanrt serve``: an OpenAI-compatible video service (``pip install 'wanrt[serve]'``): a durable job queue in
SQLite, one worker per Engine, live progress as Server-Sent Events, Prometheus metrics and a small web page.

:func:`create_app` builds the FastAPI app of a :class:`Service`; :func:`serve` runs it with uvicorn."""

from .app import BadField, ServeConfig, Service, create_app
from .jobs import Job, JobStore
from .worker import follow

__all__ = ["BadField", "Job", "JobStore", "ServeConfig", "Service", "create_app", "follow", "serve"]


def serve(engines, config: ServeConfig, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          broadcast=None) -> None:
    """Run the service on ``host:port`` until SIGINT/SIGTERM (then it drains: see :class:`ServeConfig`);
    ``broadcast``: rank 0 of a parallel Engine (see :class:`Service`)."""
    import uvicorn

    app = create_app(Service(engines, config, model_name, broadcast))
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(config.grace_s) + 5)
