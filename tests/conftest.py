"""Shared fixtures. Triton kernels run in the interpreter when there is no GPU (set before any import).

The test session never writes the user's caches: wanrt's (``$XDG_CACHE_HOME/wanrt``: the tiny checkpoints, the
TensorRT engines) and Triton's (``~/.triton``) are pointed at one temporary folder, set here before anything
is imported (subprocesses inherit it) and removed at the end of the session.
"""

import atexit
import os
import shutil
import tempfile

_SESSION_CACHE = tempfile.mkdtemp(prefix="wanrt-test-cache-")
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = os.path.join(_SESSION_CACHE, "xdg")
os.environ["TRITON_HOME"] = os.path.join(_SESSION_CACHE, "triton-home")  # triton's ~/.triton
os.environ["TRITON_CACHE_DIR"] = os.path.join(_SESSION_CACHE, "triton-home", ".triton", "cache")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def session_cache_dir() -> str:
    """The temporary folder that holds this session's caches."""
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory):
    """A tiny random checkpoint in the official layout (single-file DiT)."""
    from wanrt.checkpoints.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "official", layout="official", preset="tiny")


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """The same tiny random checkpoint (same seed) in the diffusers layout, DiT in 2 shards."""
    from wanrt.checkpoints.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "diffusers", layout="diffusers", preset="tiny",
                            shards=2)


@pytest.fixture(scope="session")
def tiny_engine(tiny_official):
    """An fp32 Engine on the tiny official checkpoint (CPU)."""
    import wanrt

    return wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32")


def _write(tmp_path_factory, preset: str, layout: str, **kw):
    from wanrt.checkpoints.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / f"{preset}-{layout}", layout=layout, preset=preset,
                            **kw)


@pytest.fixture(scope="session")
def tiny_i2v_official(tmp_path_factory):
    """A tiny random image-to-video checkpoint (official layout, with the CLIP .pth)."""
    return _write(tmp_path_factory, "tiny-i2v", "official")


@pytest.fixture(scope="session")
def tiny_i2v_diffusers(tmp_path_factory):
    """The same tiny i2v checkpoint (same seed) in the diffusers layout (image_encoder/, DiT in 2 shards)."""
    return _write(tmp_path_factory, "tiny-i2v", "diffusers", shards=2)


@pytest.fixture(scope="session")
def tiny_flf2v_official(tmp_path_factory):
    """A tiny random first-last-frame-to-video checkpoint (official layout)."""
    return _write(tmp_path_factory, "tiny-flf2v", "official")


@pytest.fixture(scope="session")
def tiny_flf2v_diffusers(tmp_path_factory):
    """The same tiny flf2v checkpoint in the diffusers layout."""
    return _write(tmp_path_factory, "tiny-flf2v", "diffusers")
