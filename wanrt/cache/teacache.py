"""TeaCache (Liu et al. 2024; reference ``TeaCache4Wan2.1/teacache_generate.py``): skip the DiT blocks of a
denoising step whose timestep modulation barely changed, and reuse the residual of the last computed step.

Per CFG branch and step, on the host (one ``.item()`` sync, outside any CUDA graph):

* ``rel = mean(|cur - prev|) / mean(|prev|)`` (float32) of the modulated input: ``e`` ``[B, dim]`` in mode
  ``"e"``, ``e0`` ``[B, 6, dim]`` in mode ``"e0"`` (the reference's ``use_ret_steps``);
* ``acc += polyval(coefficients, rel)`` (the calibrated polynomial, highest power first);
* ``acc < threshold``: skip (blocks' output = blocks' input + the stored residual); else compute, ``acc = 0``.
* The first ``warmup_steps`` (1 for "e", 5 for "e0") and the last step always compute; ``prev`` is updated
  every step. ``threshold = 0`` never skips (some ``e0`` polynomials have a negative constant term).

Published starting points (one A800): t2v-1.3b "e" 0.08 (175 s -> 88 s); t2v-14b "e0" 0.20 (1829 s -> 578 s).
:class:`CalibrationRecord` and :func:`fit_coefficients` fit a polynomial for a new model or mode.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["TEACACHE_COEFFICIENTS", "TEACACHE_MODES", "CalibrationRecord", "TeaCache", "TeaCacheConfig",
           "default_coefficients", "fit_coefficients", "rel_l1"]

#: ``"e"``: the time-embedding output ``[B, dim]``; ``"e0"``: the time-projection output ``[B, 6, dim]``.
TEACACHE_MODES = ("e", "e0")
_DEFAULT_WARMUP = {"e": 1, "e0": 5}  # always-computed first steps per mode (reference ``ret_steps``)

TEACACHE_COEFFICIENTS: dict[str, dict[str, tuple[float, ...]]] = {
    "t2v-1.3b": {
        "e": (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
        "e0": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    },
    "t2v-14b": {
        "e": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
        "e0": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    },
    "i2v-14b-480p": {
        "e": (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
        "e0": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    },
    "i2v-14b-720p": {
        "e": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
        "e0": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
    },
}
"""Calibrated rescaling polynomials (highest power first) per preset name and mode.

Source: ``TeaCache4Wan2.1/teacache_generate.py`` (ali-vilab/TeaCache). flf2v-14b has none.
"""


def _check_mode(mode: object) -> None:
    if mode not in TEACACHE_MODES:
        raise ValueError(f"TeaCache mode must be one of {TEACACHE_MODES}, got {mode!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_finite_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def default_coefficients(preset_name: str, mode: str) -> tuple[float, ...] | None:
    """The published polynomial of a preset (case-insensitive, ``_`` read as ``-``) in ``mode``, or None when
    it has none (flf2v-14b, tiny, unknown names). Raises ValueError for an unknown mode."""
    _check_mode(mode)
    table = TEACACHE_COEFFICIENTS.get(str(preset_name).strip().lower().replace("_", "-"))
    return None if table is None else table[mode]


@dataclass(frozen=True)
class TeaCacheConfig:
    """What TeaCache skips. Every field is validated (ValueError naming the field and the value).

    Attributes:
        threshold: skip while the accumulated rescaled change stays below it; finite and ``>= 0``; ``0`` (or
            None, stored as 0.0) disables skipping.
        mode: ``"e"`` or ``"e0"`` (:data:`TEACACHE_MODES`).
        coefficients: the rescaling polynomial, highest power first (:func:`default_coefficients`,
            :func:`fit_coefficients`); required, all finite.
        warmup_steps: the first steps that always compute (``>= 1``); None: 1 in mode "e", 5 in mode "e0".
    """

    threshold: float
    mode: str = "e"
    coefficients: tuple[float, ...] = ()
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        t = 0.0 if self.threshold is None else self.threshold
        if not (_is_finite_real(t) and t >= 0):
            raise ValueError(f"TeaCache threshold must be a finite number >= 0 (0 disables), got {t!r}")
        _check_mode(self.mode)
        c = self.coefficients
        if not isinstance(c, (Sequence, np.ndarray)) or isinstance(c, (str, bytes)):
            raise ValueError(f"TeaCache coefficients must be a sequence of numbers, got {c!r}")
        if len(c) == 0:
            raise ValueError("TeaCache coefficients are required (highest power first); use "
                             "default_coefficients(preset, mode) or fit_coefficients(...)")
        if not all(_is_finite_real(v) for v in c):
            raise ValueError(f"TeaCache coefficients must all be finite numbers, got {tuple(c)!r}")
        w = self.warmup_steps
        if w is not None and not (_is_int(w) and w >= 1):
            raise ValueError(f"TeaCache warmup_steps must be an int >= 1 or None, got {w!r}")
        object.__setattr__(self, "threshold", float(t))
        object.__setattr__(self, "coefficients", tuple(float(v) for v in c))
        object.__setattr__(self, "warmup_steps", None if w is None else int(w))

    @property
    def enabled(self) -> bool:
        """Whether any step can be skipped (``threshold > 0``)."""
        return self.threshold > 0

    @property
    def effective_warmup_steps(self) -> int:
        """``warmup_steps``, or the mode's default when it is None."""
        return _DEFAULT_WARMUP[self.mode] if self.warmup_steps is None else self.warmup_steps

    @classmethod
    def for_preset(cls, preset_name: str, threshold: float, mode: str = "e",
                   warmup_steps: int | None = None) -> TeaCacheConfig:
        """A config with the published polynomial of ``preset_name`` (ValueError when it has none)."""
        coeffs = default_coefficients(preset_name, mode)
        if coeffs is None:
            raise ValueError(f"no TeaCache coefficients for preset {preset_name!r}; known: "
                             f"{', '.join(TEACACHE_COEFFICIENTS)} (calibrate with fit_coefficients and pass "
                             "coefficients=...)")
        return cls(threshold=threshold, mode=mode, coefficients=coeffs, warmup_steps=warmup_steps)


def _rel_l1(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    prev = prev.float()
    return (cur.float() - prev).abs().mean() / prev.abs().mean()


def rel_l1(cur: torch.Tensor, prev: torch.Tensor) -> float:
    """``mean(|cur - prev|) / mean(|prev|)`` in float32, as a Python float (one host sync; inf or nan when
    ``prev`` is all zeros). Raises ValueError when the shapes differ."""
    if cur.shape != prev.shape:
        raise ValueError(f"rel_l1: shapes differ: cur {tuple(cur.shape)} vs prev {tuple(prev.shape)}")
    return float(_rel_l1(cur, prev).item())


@dataclass
class _BranchState:
    """One CFG branch's state within one video."""

    next_step: int = 0
    accumulated: float = 0.0
    prev_input: torch.Tensor | None = None  # float32 copy of the last modulated input
    residual: torch.Tensor | None = None  # blocks' output - blocks' input at the last computed step
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


class TeaCache:
    """TeaCache state for one video of ``num_steps`` steps; each branch (default the two CFG passes) keeps its
    own accumulator, previous input and residual. Per branch, steps 0..num_steps-1 in order::

        if cache.should_compute(branch, i, e_or_e0):
            cache.store(branch, blocks_out - blocks_in)
        else:
            blocks_out = blocks_in + cache.residual(branch)

    :meth:`reset` before another video. ``agree(branch, compute) -> compute`` (optional) replaces each decision
    by the one the ranks of a parallel run agreed on (:func:`wanrt.parallel.step.teacache_agreement`). Raises TypeError (``config`` not a :class:`TeaCacheConfig`) or
    ValueError (``num_steps < 1``; ``branches`` not unique non-empty strings).
    """

    def __init__(self, config: TeaCacheConfig, num_steps: int,
                 branches: tuple[str, ...] = ("cond", "uncond"), agree=None) -> None:
        if not isinstance(config, TeaCacheConfig):
            raise TypeError(f"config must be a TeaCacheConfig, got {type(config).__name__}")
        if not _is_int(num_steps) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        branches = tuple(branches)
        if not branches or not all(isinstance(b, str) and b for b in branches) or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be a non-empty tuple of unique non-empty strings, got {branches!r}")
        self.config, self.num_steps, self.branches = config, int(num_steps), branches
        self.agree = agree
        self._coefficients = np.asarray(config.coefficients, dtype=np.float64)
        self.reset()

    def _branch(self, branch: str) -> _BranchState:
        try:
            return self._state[branch]
        except (KeyError, TypeError):
            raise ValueError(f"unknown TeaCache branch {branch!r}; branches are {self.branches}") from None

    def should_compute(self, branch: str, step: int, modulated_input: torch.Tensor) -> bool:
        """Whether ``branch`` runs its blocks at ``step`` (then :meth:`store`) or reuses :meth:`residual`.

        Computes when skipping is off, in warmup, at the last step, before the branch has a residual, when
        ``rel`` is not finite, or when the accumulated change reaches the threshold (which resets it). The
        previous input is refreshed every step, in a float32 buffer allocated once per video.

        Raises:
            ValueError: unknown branch; a step out of order or ``>= num_steps``; ``modulated_input`` not
                floating-point, not ``e [B, dim]`` / ``e0 [B, 6, dim]``, or of another shape or device than
                at the previous step. A failed call changes nothing.
            TypeError: ``step`` is not an int.
        """
        st = self._branch(branch)
        if not _is_int(step):
            raise TypeError(f"step must be an int, got {step!r}")
        if step != st.next_step:
            done = " (all steps done: call reset() before a new video)" if st.next_step >= self.num_steps else ""
            raise ValueError(f"TeaCache branch {branch!r}: expected step {st.next_step}, got {step}; steps must "
                             f"arrive in order{done}")
        if step >= self.num_steps:
            raise ValueError(f"TeaCache branch {branch!r}: step {step} >= num_steps {self.num_steps}")
        x, cfg, prev = modulated_input, self.config, st.prev_input
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"modulated_input must be a floating-point tensor, got {got}")
        if (cfg.mode == "e" and x.ndim != 2) or (cfg.mode == "e0" and (x.ndim != 3 or x.shape[1] != 6)):
            want = "the time embedding e [B, dim]" if cfg.mode == "e" else "the time projection e0 [B, 6, dim]"
            raise ValueError(f"mode {cfg.mode!r} expects {want}, got shape {tuple(x.shape)}")
        if prev is not None and (prev.shape != x.shape or prev.device != x.device):
            what, was, now = (("shape", tuple(prev.shape), tuple(x.shape)) if prev.shape != x.shape
                              else ("device", prev.device, x.device))
            raise ValueError(f"TeaCache branch {branch!r}: modulated_input {what} changed from {was} to {now} "
                             "within one video")

        compute = True
        if cfg.enabled and prev is not None and cfg.effective_warmup_steps <= step < self.num_steps - 1:
            rel = float(_rel_l1(x, prev).item())  # the one host sync
            if math.isfinite(rel):  # a non-finite rel (prev all zeros) computes
                st.accumulated += float(np.polyval(self._coefficients, rel))
                compute = not (st.accumulated < cfg.threshold and st.residual is not None)
        if self.agree is not None:  # ranks of a parallel run follow one decision (wanrt.parallel.step)
            compute = bool(self.agree(branch, compute)) or st.residual is None
        if compute:
            st.accumulated = 0.0
        if cfg.enabled:  # disabled: exactly the uncached run (no comparison, no sync, no buffer)
            if prev is None:
                st.prev_input = x.detach().to(dtype=torch.float32, copy=True)
            else:
                prev.copy_(x.detach())
        st.next_step += 1
        (st.computed if compute else st.skipped).append(int(step))
        return compute

    def store(self, branch: str, residual: torch.Tensor) -> None:
        """Keep a copy of ``branch``'s residual (blocks' output - blocks' input; float32 is closest to the
        reference), in a buffer reused while its shape, dtype and device stay the same."""
        st = self._branch(branch)
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a tensor, got {type(residual).__name__}")
        buf = st.residual
        if buf is None or (buf.shape, buf.dtype, buf.device) != (residual.shape, residual.dtype, residual.device):
            st.residual = residual.detach().clone(memory_format=torch.contiguous_format)
        else:
            buf.copy_(residual.detach())

    def residual(self, branch: str) -> torch.Tensor:
        """The buffer stored for ``branch`` (read it, do not modify it); RuntimeError when none is stored."""
        st = self._branch(branch)
        if st.residual is None:
            raise RuntimeError(f"TeaCache: no residual stored for branch {branch!r}; call store() after computing")
        return st.residual

    def reset(self) -> None:
        """Forget everything (steps, accumulators, buffers, stats) for a new video; the buffers are freed."""
        self._state = {b: _BranchState() for b in self.branches}

    @property
    def stats(self) -> dict[str, dict[str, list[int]]]:
        """A copy of the steps computed and skipped per branch: ``{"cond": {"computed": [...], "skipped": [...]}}``."""
        return {b: {"computed": list(s.computed), "skipped": list(s.skipped)} for b, s in self._state.items()}

    def summary(self) -> dict[str, dict[str, int]]:
        """The number of steps computed and skipped per branch: ``{"cond": {"computed": n, "skipped": m}}``."""
        return {b: {"computed": len(s.computed), "skipped": len(s.skipped)} for b, s in self._state.items()}


@dataclass
class CalibrationRecord:
    """Calibration samples: per branch and step after the branch's first, the :func:`rel_l1` change of the
    modulated input (``e`` or ``e0``, by :attr:`mode`) and of the branch's output against its previous step.

    The record is a ``GuidedStep`` recorder (``recorder=record``: GuidedStep reads :attr:`mode` and calls
    :meth:`record` per branch and step); :meth:`fit` gives the polynomial. Pool several runs in one record.
    """

    mode: str = "e"
    input_changes: list[float] = field(default_factory=list)
    output_changes: list[float] = field(default_factory=list)
    _prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False,
                                                                 compare=False)

    def __post_init__(self) -> None:
        _check_mode(self.mode)

    def add(self, input_change: float, output_change: float) -> None:
        """Append one (input change, output change) pair."""
        self.input_changes.append(float(input_change))
        self.output_changes.append(float(output_change))

    def record(self, branch: str, step: int, modulated_input: torch.Tensor, velocity: torch.Tensor) -> None:
        """Add the changes against ``branch``'s previous call (none at its first) and keep float32 copies."""
        prev = self._prev.get(branch)
        if prev is not None:
            self.add(rel_l1(modulated_input, prev[0]), rel_l1(velocity, prev[1]))
        self._prev[branch] = (modulated_input.detach().float().clone(), velocity.detach().float().clone())

    __call__ = record

    def fit(self, degree: int = 4) -> tuple[float, ...]:
        """:func:`fit_coefficients` of the recorded pairs."""
        return fit_coefficients(self.input_changes, self.output_changes, degree)


def fit_coefficients(input_changes: Sequence[float] | np.ndarray, output_changes: Sequence[float] | np.ndarray,
                     degree: int = 4) -> tuple[float, ...]:
    """Least-squares polynomial (``numpy.polyfit``, highest power first) from input change to output change,
    over the finite pairs; degree 4 as the published tables.

    Raises:
        ValueError: lengths differ, ``degree < 0``, fewer than ``degree + 1`` finite pairs or distinct input
            changes, all input changes equal, or an ill-conditioned fit.
    """
    if not _is_int(degree) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    x = np.asarray(input_changes, dtype=np.float64).reshape(-1)
    y = np.asarray(output_changes, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"input_changes ({x.size}) and output_changes ({y.size}) must have the same length")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, need = x[keep], y[keep], int(degree) + 1
    if x.size < need:
        raise ValueError(f"a degree-{degree} fit needs at least {need} finite (input, output) pairs, got {x.size}"
                         f" ({int((~keep).sum())} non-finite dropped)")
    distinct = np.unique(x).size
    if distinct == 1:
        raise ValueError(f"all {x.size} input changes are equal ({x[0]!r}); nothing to fit")
    if distinct < need:
        raise ValueError(f"a degree-{degree} fit needs at least {need} distinct input changes, got {distinct}")
    rank_warning = getattr(np, "exceptions", np).RankWarning  # np.exceptions is numpy >= 1.25
    with warnings.catch_warnings():
        warnings.simplefilter("error", rank_warning)
        try:
            coeffs = np.polyfit(x, y, int(degree))
        except rank_warning as err:
            raise ValueError(f"the degree-{degree} fit is ill-conditioned: {err}") from None
    return tuple(float(c) for c in coeffs)
