"""wanrt: a lean, fast inference runtime for the Wan2.1 video-generation models.

Public API::

    video = wanrt.Engine("tiny").generate("a corgi surfing a wave", seed=7)
    video.save("corgi.mp4")

    req = engine.request("a corgi", num_frames=33)   # resolved and judged before any work
    video = engine.run(req)

    dit = wanrt.load_transformer(path, device="cuda", dtype=torch.bfloat16)
    vae = wanrt.load_vae(path)
    t5 = wanrt.load_text_encoder(path)
    clip = wanrt.load_image_encoder(path)   # i2v / flf2v checkpoints

    # torchrun --nproc-per-node 4 script.py
    wanrt.distributed.init()
    engine = wanrt.Engine("t2v-14b", path, parallel=wanrt.ParallelConfig(ulysses=2, ring=2))  # or "auto"
"""

from .checkpoints.io import CheckpointError
from .checkpoints.layout import LayoutError
from .checkpoints.loaders import load_image_encoder, load_text_encoder, load_transformer, load_vae
from . import distributed, vace
from .engine import Cancelled, Engine, EngineConfig, GenerationError
from .parallel.config import ParallelConfig
from .presets import PRESETS, Preset
from .request import Request, resolve_request
from .video import Video

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "EngineConfig",
    "Video",
    "PRESETS",
    "Preset",
    "Request",
    "resolve_request",
    "load_transformer",
    "load_vae",
    "load_text_encoder",
    "load_image_encoder",
    "CheckpointError",
    "LayoutError",
    "GenerationError",
    "Cancelled",
    "ParallelConfig",
    "distributed",
    "vace",
]
