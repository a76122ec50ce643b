"""Shared fixtures. Triton kernels run in the interpreter when there is no GPU (set before any import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
