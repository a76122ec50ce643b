"""Procedural captioned clips for the project's own tiny Wan model: one or two shapes moving over a plain or gradient
background, with a caption that says what happens. Deterministic by seed; NumPy only. The first object is the
dominant one (larger; a second object is smaller and only translates).

A clip is ``uint8 [F, H, W, 3]`` at 16 fps (64×64 or 64×96, 9–17 frames), its caption (wording varied so the text
encoder's features matter), and :class:`ClipSpec`, what the caption says in structured form (for the
prompt-adherence score of :mod:`wanrt.demo.adherence`). :func:`parse_caption` reads a caption back into a spec
without its seed-dependent details, so a prompt typed by a user is scored the same way.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
          "white": (240, 240, 240), "orange": (245, 140, 30), "purple": (150, 60, 200)}
BACKGROUNDS = {"black": ((10, 10, 10), (10, 10, 10)), "dark blue": ((15, 25, 70), (15, 25, 70)),
               "gray": ((110, 110, 110), (110, 110, 110)), "dark green": ((15, 60, 25), (15, 60, 25)),
               "dark gradient": ((10, 10, 40), (60, 20, 60)), "blue gradient": ((20, 30, 90), (5, 5, 25))}
SHAPES = ("circle", "square", "triangle", "star")
MOTIONS = ("left", "right", "up", "down", "grows", "shrinks")
SIZES = ((64, 64), (64, 96))  # (height, width)
FRAME_COUNTS = (9, 13, 17)

_MOVE_WORDS = {
    "left": ("moves left", "slides to the left", "drifts left", "travels left"),
    "right": ("moves right", "slides to the right", "drifts right", "travels right"),
    "up": ("moves up", "rises", "floats upward", "travels up"),
    "down": ("moves down", "falls", "sinks downward", "travels down"),
    "grows": ("grows", "gets bigger", "expands", "swells"),
    "shrinks": ("shrinks", "gets smaller", "contracts", "dwindles"),
}
_BG_WORDS = ("on a {bg} background", "over a {bg} backdrop", "against a {bg} background", "in front of a {bg} wall")


@dataclass(frozen=True)
class ObjectSpec:
    """One object: its shape, colour name and motion."""

    shape: str
    color: str
    motion: str


@dataclass(frozen=True)
class ClipSpec:
    """What a clip shows: its objects (the first is the dominant, larger one) and background."""

    objects: tuple[ObjectSpec, ...]
    background: str


def _caption(spec: ClipSpec, rng: random.Random) -> str:
    parts = []
    for k, o in enumerate(spec.objects):
        article = "a" if k == 0 or rng.random() < 0.5 else "one"
        parts.append(f"{article} {o.color} {o.shape} {rng.choice(_MOVE_WORDS[o.motion])}")
    text = " and ".join(parts) + " " + rng.choice(_BG_WORDS).format(bg=spec.background)
    return text


_OBJECT = re.compile(r"\b(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b")
_BG_MARK = re.compile(r" (?:on|over|against|in front of) an? ")


def parse_caption(caption: str) -> ClipSpec | None:
    """The spec a caption (or a user's prompt in the same words) states, or None when it names no
    colour-shape pair. Objects are ``<colour> <shape>`` pairs in order, each with the first motion phrase after
    it (``motion=""`` when there is none); the background is what follows "on a", "over a", ...."""
    text = " ".join(caption.lower().split())
    cut = _BG_MARK.search(text)
    body, tail = (text[:cut.start()], text[cut.end():]) if cut else (text, "")
    found = list(_OBJECT.finditer(body))
    if not found:
        return None
    objects = []
    for k, m in enumerate(found):
        end = found[k + 1].start() if k + 1 < len(found) else len(body)
        words = body[m.end():end]
        motion = next((mo for mo, phrases in _MOVE_WORDS.items() if any(p in words for p in phrases)), "")
        objects.append(ObjectSpec(m.group(2), m.group(1), motion))
    bg = next((b for b in sorted(BACKGROUNDS, key=len, reverse=True) if tail.startswith(b)), "")
    return ClipSpec(tuple(objects), bg)


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` centred at ``(cy, cx)`` with radius ``r`` (pixels) over the grid ``yy, xx``."""
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    if shape == "triangle":  # apex up: inside the three half-planes
        h = r * 1.5
        return (dy <= h / 2) & (dy >= -h / 2 + np.abs(dx) * 1.5)
    if shape == "star":  # five points: radius varies with the angle between r and 0.45 r
        angle = np.arctan2(dy, dx) + math.pi / 2
        frac = np.abs(((angle * 5 / (2 * math.pi)) % 1.0) - 0.5) * 2  # 0 at a point, 1 between points
        return np.sqrt(dy * dy + dx * dx) <= r * (1 - 0.55 * frac)
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: ClipSpec, height: int, width: int, frames: int, rng: random.Random) -> np.ndarray:
    """The frames ``uint8 [F, H, W, 3]`` of ``spec`` (positions, sizes and speeds drawn from ``rng``)."""
    top, bottom = (np.array(c, np.float32) for c in BACKGROUNDS[spec.background])
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    background = (top * (1 - t) + bottom * t) * np.ones((1, width, 1), np.float32)  # [H, W, 3] vertical gradient
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tracks = []
    for k, o in enumerate(spec.objects):
        r0 = rng.uniform(9, 12) if k == 0 else rng.uniform(4, 6)  # the first object dominates
        travel = rng.uniform(0.35, 0.5)
        cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
        dy = dx = 0.0
        if o.motion in ("left", "right"):
            dx = travel * width * (-1 if o.motion == "left" else 1)
            cx -= dx / 2
        elif o.motion in ("up", "down"):
            dy = travel * height * (-1 if o.motion == "up" else 1)
            cy -= dy / 2
        r1 = r0 * (1.7 if o.motion == "grows" else 0.55 if o.motion == "shrinks" else 1.0)
        tracks.append((o, cy, cx, dy, dx, r0, r1))
    out = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        s = f / max(1, frames - 1)
        img = background.copy()
        for o, cy, cx, dy, dx, r0, r1 in reversed(tracks):  # the dominant object drawn last, on top
            m = _mask(o.shape, yy, xx, cy + s * dy, cx + s * dx, r0 + s * (r1 - r0))
            img[m] = COLORS[o.color]
        out[f] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return out


def make_clip(seed: int, height: int | None = None, width: int | None = None,
              frames: int | None = None) -> tuple[np.ndarray, str, ClipSpec]:
    """Clip number ``seed``: ``(frames uint8 [F, H, W, 3], caption, spec)``; size and frame count drawn from
    :data:`SIZES` and :data:`FRAME_COUNTS` unless given. The same seed always gives the same clip."""
    rng = random.Random(seed)
    if height is None or width is None:
        height, width = rng.choice(SIZES)
    frames = frames if frames is not None else rng.choice(FRAME_COUNTS)
    n = 1 if rng.random() < 0.7 else 2
    colors = rng.sample(list(COLORS), n)
    # a second object only translates (and is smaller), so the first one stays the dominant one in every frame
    objects = tuple(ObjectSpec(rng.choice(SHAPES), colors[k], rng.choice(MOTIONS if k == 0 else MOTIONS[:4]))
                    for k in range(n))
    bg = rng.choice(list(BACKGROUNDS))
    spec = ClipSpec(objects, bg)
    return render(spec, height, width, frames, rng), _caption(spec, rng), spec


def held_out_captions(n: int = 64, seed: int = 10_000_019) -> list[tuple[str, ClipSpec]]:
    """``n`` captions (with their specs) from seeds the training data never uses (training draws from
    ``0 .. 10**7``), one object each: the prompts of the quality gate."""
    out = []
    k = 0
    while len(out) < n:
        _, caption, spec = make_clip(seed + k, 64, 64, 9)
        k += 1
        if len(spec.objects) == 1:
            out.append((caption, spec))
    return out
