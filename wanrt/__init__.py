"""wanrt: a lean, fast inference runtime for the Wan2.1 video-generation models.

Public API::

    video = wanrt.Engine("tiny").generate("a corgi surfing a wave", seed=7)
    video.save("corgi.mp4")

    dit = wanrt.load_transformer(path, device="cuda", dtype=torch.bfloat16)
    vae = wanrt.load_vae(path)
    t5 = wanrt.load_text_encoder(path)
    clip = wanrt.load_image_encoder(path)   # i2v / flf2v checkpoints
"""

from .checkpoints.io import CheckpointError
from .checkpoints.layout import LayoutError
from .checkpoints.loaders import load_image_encoder, load_text_encoder, load_transformer, load_vae
from .engine import Cancelled, Engine, EngineConfig, GenerationError
from .presets import PRESETS, Preset
from .video import Video

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "EngineConfig",
    "Video",
    "PRESETS",
    "Preset",
    "load_transformer",
    "load_vae",
    "load_text_encoder",
    "load_image_encoder",
    "CheckpointError",
    "LayoutError",
    "GenerationError",
    "Cancelled",
]
