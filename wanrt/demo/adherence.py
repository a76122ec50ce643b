"""A prompt-adherence score computed from the frames alone, independent of any model: does the clip's dominant
object have the colour the caption names, and does it move (or grow, or shrink) the way the caption says?

* Foreground: pixels far (> 60 in RGB) from their row's median colour over the whole clip (the backgrounds are plain
  or vertical gradients, and the objects cover a small part of each row over time).
* Colour: the hue of the foreground. Each foreground pixel with a saturation of at least 0.25 takes the named colour
  (:data:`wanrt.demo.data.COLORS`) of the nearest hue; an unsaturated one is "white" when bright (value above 0.6)
  and no colour otherwise. The colour most pixels take wins. Hue, not the nearest RGB value: a soft object's edge
  pixels are darker blends with the background, and a dark orange is nearer red than orange in RGB though its hue
  is orange's.
* Motion: the centroid and area of the foreground pixels of that colour in the first and last quarter of the
  frames. An area ratio beyond 1.6 (or below 1 / 1.6) with the centroid shifted by less than half the radius reads
  as grows / shrinks; otherwise the larger of the horizontal and vertical shifts (at least 3 pixels) gives left /
  right / up / down.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import COLORS, ClipSpec

_NAMES = list(COLORS)
_WHITE = _NAMES.index("white")
_MIN_SATURATION = 0.25  # below: no hue (white when bright, else nothing)
_MIN_WHITE_VALUE = 0.6


def _hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees in [0, 360)), saturation and value (both in [0, 1]) of RGB values ``x [..., 3]`` in [0, 255]."""
    x = x.astype(np.float32) / 255.0
    hi, lo = x.max(-1), x.min(-1)
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = np.where(hi == r, ((g - b) / safe) % 6, np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    sat = np.where(hi > 0, span / np.where(hi > 0, hi, 1.0), 0.0)
    return hue, sat, hi


_RGB = np.array([COLORS[n] for n in _NAMES], np.float32)  # [K, 3]
_HUE = _hsv(_RGB)[0]  # [K]
_CHROMATIC = np.array([k for k in range(len(_NAMES)) if k != _WHITE])


def color_classes(x: np.ndarray) -> np.ndarray:
    """The index into the named colours (``list(COLORS)``) of each RGB value of ``x [..., 3]`` (uint8 or float in
    [0, 255]): nearest hue if saturated, white if unsaturated and bright, -1 (no colour) otherwise."""
    hue, sat, val = _hsv(x)
    gap = np.abs((hue[..., None] - _HUE[_CHROMATIC] + 180) % 360 - 180)  # [..., K-1] circular hue distance
    nearest = _CHROMATIC[gap.argmin(-1)]
    return np.where(sat >= _MIN_SATURATION, nearest, np.where(val > _MIN_WHITE_VALUE, _WHITE, -1))


@dataclass(frozen=True)
class Reading:
    """What the frames show: the dominant colour and motion (None when no foreground is found)."""

    color: str | None
    motion: str | None


def read_clip(frames: np.ndarray) -> Reading:
    """The :class:`Reading` of ``frames`` (uint8 ``[F, H, W, 3]``)."""
    x = frames.astype(np.float32)
    bg = np.median(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1, 3), axis=1)[None, :, None, :]  # [1, H, 1, 3]
    fg = np.linalg.norm(x - bg, axis=-1) > 60  # [F, H, W]
    if fg.sum() < 4:
        return Reading(None, None)
    classes = color_classes(x)  # [F, H, W]
    votes = classes[fg]
    votes = votes[votes >= 0]
    if votes.size == 0:
        return Reading(None, None)
    k = int(np.bincount(votes, minlength=len(_NAMES)).argmax())
    color = _NAMES[k]
    own = fg & (classes == k)  # [F, H, W]: the object's pixels
    f = len(frames)
    q = max(1, f // 4)

    def stats(sl):
        ys, xs = [], []
        area = 0
        for m in own[sl]:
            yy, xx = np.nonzero(m)
            area += len(yy)
            ys.extend(yy)
            xs.extend(xx)
        if not ys:
            return None
        return float(np.mean(ys)), float(np.mean(xs)), area / max(1, len(own[sl]))

    a, b = stats(slice(0, q)), stats(slice(f - q, f))
    if a is None or b is None:
        return Reading(color, None)
    dy, dx = b[0] - a[0], b[1] - a[1]
    ratio = (b[2] + 1) / (a[2] + 1)
    radius = np.sqrt(max(a[2], b[2]) / np.pi)
    if (ratio > 1.6 or ratio < 1 / 1.6) and np.hypot(dy, dx) < radius / 2:
        return Reading(color, "grows" if ratio > 1 else "shrinks")
    if max(abs(dx), abs(dy)) < 3:
        return Reading(color, None)
    if abs(dx) >= abs(dy):
        return Reading(color, "right" if dx > 0 else "left")
    return Reading(color, "down" if dy > 0 else "up")


def adheres(frames: np.ndarray, spec: ClipSpec) -> bool:
    """Whether ``frames`` show the first object of ``spec`` with its colour and motion."""
    reading = read_clip(frames)
    want = spec.objects[0]
    return reading.color == want.color and (not want.motion or reading.motion == want.motion)


def adherence(clips, specs) -> float:
    """The fraction of ``clips`` that show what their ``specs`` say (:func:`adheres`)."""
    results = [adheres(f, s) for f, s in zip(clips, specs, strict=True)]
    return sum(results) / max(1, len(results))
