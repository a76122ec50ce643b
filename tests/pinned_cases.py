"""The generations whose final latents are pinned in ``tests/data/pinned_latents.safetensors``.

Each case is one ``generate()`` on a tiny random checkpoint (official layout, written by
``wanrt.checkpoints.tiny.write_checkpoint`` with its default seed; the t2v ones at the DiT size the ``tiny`` preset
had when they were recorded, :data:`PINNED_TINY_DIT`) on the CPU in float32. The file was recorded
before the generation code was reshaped into plain parts over one request: a refactor must leave
every one of these bit-identical. Regenerate only when a change of numerics is intended, and say so:
``python tests/pinned_cases.py`` (writes the file).

Re-recorded once on 2026-12-06 for the three TeaCache cases only, whose step count went from 6 to 8 when TeaCache
started refusing fewer than 8 steps (a change of the cases, not of the numerics: every other entry was re-recorded
bit-identical). Re-recorded a second time the same day for the four image cases only, when the VAE's CPU convolutions
moved to oneDNN (an intended change of numerics at float32 rounding: these cases run the VAE encoder on the
conditioning frames; they moved by at most 9.4e-7 relative). The nine t2v cases were re-recorded bit-identical.
"""

from __future__ import annotations

COEFS = (0.0, 0.0, 0.0, 0.1, 0.0)  # makes the tiny model skip about every other step (see test_engine_loop.py)
BASE = dict(height=32, width=48, num_frames=5, num_inference_steps=4, progress=False)

#: name -> (preset, engine options, generate() keyword arguments)
CASES: dict[str, tuple[str, dict, dict]] = {
    "t2v-unipc": ("tiny", {}, dict(seed=11)),
    "t2v-dpm++": ("tiny", {}, dict(seed=12, sample_solver="dpm++")),
    "t2v-euler": ("tiny", {}, dict(seed=13, sample_solver="euler", shift=3.0)),
    "t2v-unipc-cfg-batch": ("tiny", {"cfg_batch": True}, dict(seed=11)),
    "t2v-teacache": ("tiny", {}, dict(seed=14, num_inference_steps=8, teacache_threshold=0.25,
                                       teacache_coefficients=COEFS)),
    "t2v-teacache-cfg-batch": ("tiny", {"cfg_batch": True}, dict(seed=14, num_inference_steps=8,
                                                                  teacache_threshold=0.25,
                                                                  teacache_coefficients=COEFS)),
    "t2v-teacache-e0": ("tiny", {}, dict(seed=15, num_inference_steps=8, teacache_threshold=0.25,
                                          teacache_mode="e0", teacache_coefficients=COEFS)),
    "t2v-guidance-1": ("tiny", {}, dict(seed=16, guidance_scale=1.0, negative_prompt="ignored")),
    "t2v-negative-prompt": ("tiny", {}, dict(seed=17, negative_prompt="blurry, static")),
    "i2v": ("tiny-i2v", {}, dict(seed=18, image="first")),
    "i2v-cfg-batch-teacache": ("tiny-i2v", {"cfg_batch": True}, dict(seed=18, image="first", num_inference_steps=8,
                                                                     teacache_threshold=0.25,
                                                                     teacache_coefficients=COEFS)),
    "i2v-max-area": ("tiny-i2v", {}, dict(seed=19, image="portrait", max_area=48 * 32, height=None, width=None)),
    "flf2v": ("tiny-flf2v", {}, dict(seed=20, image="first", last_image="last")),
}


def image(name: str):
    """The test images named in :data:`CASES` (deterministic uint8 arrays)."""
    import numpy as np

    h, w, seed = {"first": (32, 48, 1), "last": (40, 40, 2), "portrait": (60, 36, 3)}[name]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + rng.integers(-30, 31, size=(h, w, 3)), 0, 255).astype(np.uint8)


def run_case(name: str, checkpoints: dict):
    """Final latents ``[1, 16, F', H', W']`` float32 of case ``name``; ``checkpoints`` maps preset -> folder."""
    import wanrt

    preset, options, kwargs = CASES[name]
    kwargs = {**BASE, **kwargs}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in ("height", "width")}
    for key in ("image", "last_image"):
        if key in kwargs:
            kwargs[key] = image(kwargs[key])
    if preset == "tiny":  # the pre-trained-model tiny size: a generic t2v checkpoint, the same defaults
        engine = wanrt.Engine.from_pretrained(checkpoints[preset], device="cpu", precision="fp32", **options)
    else:
        engine = wanrt.Engine(preset, checkpoints[preset], device="cpu", precision="fp32", **options)
    return engine.generate("a corgi surfing a wave", **kwargs).latents


def write_checkpoints(root) -> dict:
    """The tiny official-layout checkpoints of every preset in :data:`CASES`, under ``root``."""
    from pathlib import Path

    from wanrt.checkpoints.tiny import write_checkpoint

    return {p: write_checkpoint(Path(root) / p, layout="official", preset=_written(p))
            for p in sorted({c[0] for c in CASES.values()})}


#: The DiT of the ``tiny`` preset when the cases were recorded (dim 64, 2 layers, 512 text tokens). Should the preset grow (to a
#: trained model's size), the t2v cases keep the recorded architecture, so that they still pin the generation code
#: bit for bit.
PINNED_TINY_DIT = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=512)


def _written(name: str):
    import dataclasses

    from wanrt.presets import get_preset

    p = get_preset(name)
    return dataclasses.replace(p, arch=dataclasses.replace(p.arch, **PINNED_TINY_DIT)) if name == "tiny" else name


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        ckpts = write_checkpoints(d)
        out = {name: run_case(name, ckpts).contiguous() for name in CASES}
    path = Path(__file__).parent / "data" / "pinned_latents.safetensors"
    save_file(out, str(path))
    print(f"wrote {len(out)} cases to {path}")
