"""TeaCache: skip DiT denoising steps whose timestep embedding barely changed.

TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
reference code ``TeaCache4Wan2.1/teacache_generate.py``) decides on the host, per step and per CFG branch,
whether to run the DiT blocks or to reuse the residual of the last computed step. For one branch:

* ``rel = mean(|cur - prev|) / mean(|prev|)`` (float32), the relative L1 change of the modulated input
  between consecutive steps. The modulated input is ``e`` (the time-embedding output, ``[B, dim]``) in
  mode ``"e"``, or ``e0`` (the time-projection output, ``[B, 6, dim]``) in mode ``"e0"`` (the reference's
  ``use_ret_steps``, "retention" mode).
* ``acc += polyval(coefficients, rel)``: the model's calibrated polynomial (highest power first) maps the
  input change to an estimate of the output change.
* ``acc < threshold``: skip. All DiT blocks are skipped and the residual stored at the last computed step
  (blocks' output - blocks' input) is added to the blocks' input instead.
  Otherwise compute and reset ``acc = 0``.
* The first ``warmup_steps`` steps (1 in mode ``"e"``, 5 in mode ``"e0"``) and the last step always compute.
* ``prev`` is updated at every step, computed or skipped.

``threshold = 0`` disables skipping and gives exactly the uncached result (it is special-cased: some ``e0``
polynomials have a negative constant term, so the accumulated sum alone would skip).

Recommended starting points (published, one A800, official Wan2.1 code):

* t2v-1.3b, mode ``"e"``, threshold 0.08: 175 s -> 88 s.
* t2v-14b, mode ``"e0"`` (ret_steps), threshold 0.20: 1829 s -> 578 s.

Typical loop (one :class:`TeaCache` per video, or :meth:`TeaCache.reset` between videos)::

    cache = TeaCache(TeaCacheConfig.for_preset("t2v-1.3b", threshold=0.08), num_steps=50)
    for i, t in enumerate(timesteps):
        for branch in ("cond", "uncond"):
            ...  # patch embedding, e [B, dim], e0 [B, 6, dim]
            if cache.should_compute(branch, i, e):  # e0 in mode "e0"
                x_in = x
                x = run_blocks(x, ...)
                cache.store(branch, x - x_in)
            else:
                x = x + cache.residual(branch)
            ...  # head, unpatchify

The decision costs one host sync per branch per step (``.item()`` of ``rel``); it runs outside any CUDA
graph. The calibration helpers (:class:`CalibrationRecord`, :func:`rel_l1`, :func:`fit_coefficients`)
produce coefficients for a new model or mode.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "TEACACHE_COEFFICIENTS",
    "TEACACHE_MODES",
    "CalibrationRecord",
    "TeaCache",
    "TeaCacheConfig",
    "default_coefficients",
    "fit_coefficients",
    "rel_l1",
]

TEACACHE_MODES = ("e", "e0")
"""``"e"``: the time-embedding output ``[B, dim]``; ``"e0"``: the time-projection output ``[B, 6, dim]``."""

#: Default warmup (always-computed first steps) per mode: 1 for "e", 5 for "e0" (reference ``ret_steps``).
_DEFAULT_WARMUP = {"e": 1, "e0": 5}

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


def default_coefficients(preset_name: str, mode: str) -> tuple[float, ...] | None:
    """The published TeaCache polynomial for a preset and mode.

    Args:
        preset_name: a ``wanrt.presets`` name, e.g. ``"t2v-1.3b"`` (case-insensitive, ``_`` read as ``-``).
        mode: ``"e"`` or ``"e0"``.

    Returns:
        The 5 coefficients, highest power first, or ``None`` when the preset has no published polynomial
        (flf2v-14b, tiny, unknown names).

    Raises:
        ValueError: ``mode`` is not one of :data:`TEACACHE_MODES`.
    """
    if mode not in TEACACHE_MODES:
        raise ValueError(f"TeaCache mode must be one of {TEACACHE_MODES}, got {mode!r}")
    table = TEACACHE_COEFFICIENTS.get(str(preset_name).strip().lower().replace("_", "-"))
    return None if table is None else table[mode]


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_sequence(x: object) -> bool:
    return isinstance(x, (Sequence, np.ndarray)) and not isinstance(x, (str, bytes))


@dataclass(frozen=True)
class TeaCacheConfig:
    """What TeaCache skips: threshold, mode and rescaling polynomial.

    Attributes:
        threshold: skip while the accumulated rescaled change stays below it; ``>= 0`` and finite.
            ``0`` (``None`` is accepted and stored as ``0.0``) disables skipping.
        mode: ``"e"`` (compare the time embedding ``e``) or ``"e0"`` (compare the time projection ``e0``).
        coefficients: the rescaling polynomial, highest power first (as ``np.polyval``); required, at
            least one finite entry. See :func:`default_coefficients`.
        warmup_steps: the first steps that always compute; ``None`` means 1 in mode ``"e"`` and 5 in mode
            ``"e0"`` (:attr:`effective_warmup_steps`). At least 1.

    Raises:
        ValueError: any field out of range (the message names the field and the value).
    """

    threshold: float
    mode: str = "e"
    coefficients: tuple[float, ...] = ()
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        threshold = 0.0 if self.threshold is None else self.threshold
        if not _is_real(threshold) or not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"TeaCache threshold must be a finite number >= 0 (0 disables), got {threshold!r}")
        object.__setattr__(self, "threshold", float(threshold))
        if self.mode not in TEACACHE_MODES:
            raise ValueError(f"TeaCache mode must be one of {TEACACHE_MODES}, got {self.mode!r}")
        coeffs = self.coefficients
        if not _is_sequence(coeffs):
            raise ValueError(f"TeaCache coefficients must be a sequence of numbers, got {coeffs!r}")
        if len(coeffs) == 0:
            raise ValueError(
                "TeaCache coefficients are required (highest power first); use default_coefficients(preset, mode)"
                " or fit_coefficients(...)"
            )
        if not all(_is_real(c) and math.isfinite(c) for c in coeffs):
            raise ValueError(f"TeaCache coefficients must all be finite numbers, got {tuple(coeffs)!r}")
        object.__setattr__(self, "coefficients", tuple(float(c) for c in coeffs))
        w = self.warmup_steps
        if w is not None and (not isinstance(w, (int, np.integer)) or isinstance(w, bool) or w < 1):
            raise ValueError(f"TeaCache warmup_steps must be an int >= 1 or None, got {w!r}")
        if w is not None:
            object.__setattr__(self, "warmup_steps", int(w))

    @property
    def enabled(self) -> bool:
        """Whether any step can be skipped (``threshold > 0``)."""
        return self.threshold > 0

    @property
    def effective_warmup_steps(self) -> int:
        """``warmup_steps``, or the mode's default (1 for ``"e"``, 5 for ``"e0"``) when it is ``None``."""
        return _DEFAULT_WARMUP[self.mode] if self.warmup_steps is None else self.warmup_steps

    @classmethod
    def for_preset(
        cls, preset_name: str, threshold: float, mode: str = "e", warmup_steps: int | None = None
    ) -> TeaCacheConfig:
        """A config with the published polynomial of ``preset_name`` for ``mode``.

        Raises:
            ValueError: unknown mode, or no published coefficients for this preset (the message lists
                the presets that have them).
        """
        coeffs = default_coefficients(preset_name, mode)
        if coeffs is None:
            raise ValueError(
                f"no TeaCache coefficients for preset {preset_name!r}; known: {', '.join(TEACACHE_COEFFICIENTS)}"
                " (calibrate with fit_coefficients and pass coefficients=...)"
            )
        return cls(threshold=threshold, mode=mode, coefficients=coeffs, warmup_steps=warmup_steps)


def _rel_l1_tensor(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """``mean(|cur - prev|) / mean(|prev|)`` in float32, as a 0-d tensor on the inputs' device (no sync)."""
    prev32 = prev.float()
    return (cur.float() - prev32).abs().mean() / prev32.abs().mean()


def rel_l1(cur: torch.Tensor, prev: torch.Tensor) -> float:
    """Relative L1 change ``mean(|cur - prev|) / mean(|prev|)``, computed in float32.

    Args:
        cur: any floating tensor.
        prev: same shape as ``cur`` (any floating dtype, same device).

    Returns:
        The change as a Python float (one host sync); ``inf`` or ``nan`` when ``prev`` is all zeros.

    Raises:
        ValueError: the shapes differ.
    """
    if cur.shape != prev.shape:
        raise ValueError(f"rel_l1: shapes differ: cur {tuple(cur.shape)} vs prev {tuple(prev.shape)}")
    return float(_rel_l1_tensor(cur, prev).item())


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
    """Per-branch TeaCache state for one video of ``num_steps`` denoising steps.

    Each branch (by default ``"cond"`` and ``"uncond"``, the two CFG passes) keeps its own accumulator,
    previous modulated input and residual. See the module docstring for the rule and a usage example.

    Args:
        config: threshold, mode, coefficients and warmup.
        num_steps: denoising steps of the video; the last one (``num_steps - 1``) always computes.
        branches: names of the independent branches (non-empty, unique strings).

    Raises:
        ValueError: ``num_steps < 1`` or bad ``branches``.
        TypeError: ``config`` is not a :class:`TeaCacheConfig`.
    """

    def __init__(
        self, config: TeaCacheConfig, num_steps: int, branches: tuple[str, ...] = ("cond", "uncond")
    ) -> None:
        if not isinstance(config, TeaCacheConfig):
            raise TypeError(f"config must be a TeaCacheConfig, got {type(config).__name__}")
        if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        branches = tuple(branches)
        if not branches or not all(isinstance(b, str) and b for b in branches) or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be a non-empty tuple of unique non-empty strings, got {branches!r}")
        self.config = config
        self.num_steps = int(num_steps)
        self.branches = branches
        self._coefficients = np.asarray(config.coefficients, dtype=np.float64)
        self._state: dict[str, _BranchState] = {b: _BranchState() for b in branches}

    def _branch(self, branch: str) -> _BranchState:
        try:
            return self._state[branch]
        except (KeyError, TypeError):
            raise ValueError(f"unknown TeaCache branch {branch!r}; branches are {self.branches}") from None

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"modulated_input must be a floating-point tensor, got {type(x).__name__}"
                             + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
        if self.config.mode == "e" and x.ndim != 2:
            raise ValueError(f"mode 'e' expects the time embedding e [B, dim], got shape {tuple(x.shape)}")
        if self.config.mode == "e0" and (x.ndim != 3 or x.shape[1] != 6):
            raise ValueError(f"mode 'e0' expects the time projection e0 [B, 6, dim], got shape {tuple(x.shape)}")

    def should_compute(self, branch: str, step: int, modulated_input: torch.Tensor) -> bool:
        """Decide whether ``branch`` runs its DiT blocks at ``step``, and advance the branch's state.

        Computes when skipping is disabled (threshold 0), in warmup (``step < warmup_steps``), at the last
        step, when no residual has been stored for the branch yet, when ``rel`` is not finite, or when the
        accumulated rescaled change reaches the threshold (then the accumulator is reset to 0). Skips
        otherwise. The previous input is updated on every step (kept as a float32 copy on the input's
        device; the buffer is allocated once per video and refreshed with ``copy_``).

        Args:
            branch: one of :attr:`branches`.
            step: 0-based step index; per branch, steps must arrive in order 0, 1, ..., ``num_steps - 1``.
            modulated_input: ``e`` ``[B, dim]`` in mode ``"e"``, ``e0`` ``[B, 6, dim]`` in mode ``"e0"``; any
                floating dtype (compared in float32); the same shape and device at every step.

        Returns:
            True to compute the blocks (then call :meth:`store`), False to reuse :meth:`residual`.

        Raises:
            ValueError: unknown branch; a step out of order or ``>= num_steps`` (call :meth:`reset` before a
                new video); a tensor of the wrong rank, dtype, shape or device.
            TypeError: ``step`` is not an int.
        """
        st = self._branch(branch)
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {step!r}")
        if step != st.next_step:
            done = " (all steps done: call reset() before a new video)" if st.next_step >= self.num_steps else ""
            raise ValueError(
                f"TeaCache branch {branch!r}: expected step {st.next_step}, got {step}; steps must arrive in"
                f" order{done}"
            )
        if step >= self.num_steps:
            raise ValueError(f"TeaCache branch {branch!r}: step {step} >= num_steps {self.num_steps}")
        self._check_input(modulated_input)
        cfg = self.config
        if not cfg.enabled:  # exactly the uncached run: no comparison, no sync, no buffer
            st.next_step += 1
            st.computed.append(int(step))
            return True

        prev = st.prev_input
        if prev is not None:
            if prev.shape != modulated_input.shape:
                raise ValueError(
                    f"TeaCache branch {branch!r}: modulated_input shape changed from {tuple(prev.shape)} to"
                    f" {tuple(modulated_input.shape)} within one video"
                )
            if prev.device != modulated_input.device:
                raise ValueError(
                    f"TeaCache branch {branch!r}: modulated_input moved from {prev.device} to"
                    f" {modulated_input.device} within one video"
                )

        forced = step < cfg.effective_warmup_steps or step == self.num_steps - 1 or prev is None
        compute = True
        if not forced:
            rel = float(_rel_l1_tensor(modulated_input, prev).item())  # the one host sync
            if math.isfinite(rel):
                st.accumulated += float(np.polyval(self._coefficients, rel))
                compute = not (st.accumulated < cfg.threshold and st.residual is not None)
            # a non-finite rel (prev all zeros) always computes
        if compute:
            st.accumulated = 0.0

        if prev is None:
            st.prev_input = modulated_input.detach().to(dtype=torch.float32, copy=True)
        else:
            prev.copy_(modulated_input.detach())
        st.next_step += 1
        (st.computed if compute else st.skipped).append(int(step))
        return compute

    def store(self, branch: str, residual: torch.Tensor) -> None:
        """Keep ``residual`` (blocks' output - blocks' input) of ``branch``'s last computed step.

        Copies into a persistent buffer with the given tensor's shape, dtype and device; the buffer is
        reused (``copy_``) while those stay the same, and reallocated when they change.

        Args:
            branch: one of :attr:`branches`.
            residual: e.g. ``[B, S, dim]``, any dtype; kept as given (store float32 for the closest match
                to the reference, which subtracts the float32 residual stream).

        Raises:
            ValueError: unknown branch.
            TypeError: ``residual`` is not a tensor.
        """
        st = self._branch(branch)
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a tensor, got {type(residual).__name__}")
        buf = st.residual
        if (
            buf is None
            or buf.shape != residual.shape
            or buf.dtype != residual.dtype
            or buf.device != residual.device
        ):
            st.residual = residual.detach().clone(memory_format=torch.contiguous_format)
        else:
            buf.copy_(residual.detach())

    def residual(self, branch: str) -> torch.Tensor:
        """The residual stored for ``branch`` (the persistent buffer itself: read it, do not modify it).

        Raises:
            ValueError: unknown branch.
            RuntimeError: no residual stored for ``branch`` since construction or :meth:`reset`.
        """
        st = self._branch(branch)
        if st.residual is None:
            raise RuntimeError(f"TeaCache: no residual stored for branch {branch!r}; call store() after computing")
        return st.residual

    def reset(self) -> None:
        """Forget everything (steps, accumulators, previous inputs, residuals, stats) for a new video.

        The buffers are released, so the memory is free for, e.g., the VAE decode that follows.
        """
        self._state = {b: _BranchState() for b in self.branches}

    @property
    def stats(self) -> dict[str, dict[str, list[int]]]:
        """Per branch, the steps computed and skipped so far: ``{"cond": {"computed": [...], "skipped": [...]}}``.

        A fresh copy; mutating it does not affect the cache.
        """
        return {b: {"computed": list(s.computed), "skipped": list(s.skipped)} for b, s in self._state.items()}

    def summary(self) -> dict[str, dict[str, int]]:
        """Per branch, the number of steps computed and skipped: ``{"cond": {"computed": n, "skipped": m}}``."""
        return {b: {"computed": len(s.computed), "skipped": len(s.skipped)} for b, s in self._state.items()}


@dataclass
class CalibrationRecord:
    """Calibration samples for one branch: per step (from the second on), the change of the modulated input
    and of the output, each as :func:`rel_l1` against the previous step.

    Attributes:
        input_changes: ``rel_l1(e_or_e0[i], e_or_e0[i-1])`` per step ``i >= 1``.
        output_changes: ``rel_l1(out[i], out[i-1])`` per step ``i >= 1``, for the same steps.
    """

    input_changes: list[float] = field(default_factory=list)
    output_changes: list[float] = field(default_factory=list)

    def add(self, input_change: float, output_change: float) -> None:
        """Append one (input change, output change) pair."""
        self.input_changes.append(float(input_change))
        self.output_changes.append(float(output_change))


def fit_coefficients(
    input_changes: Sequence[float] | np.ndarray, output_changes: Sequence[float] | np.ndarray, degree: int = 4
) -> tuple[float, ...]:
    """Least-squares polynomial mapping the input change to the output change (``numpy.polyfit``).

    Non-finite pairs are dropped. Pool several prompts/branches by concatenating their records.

    Args:
        input_changes: relative L1 changes of the modulated input (``e`` or ``e0``), one per sample.
        output_changes: relative L1 changes of the model output, same length.
        degree: polynomial degree (4 for the published Wan2.1 tables).

    Returns:
        ``degree + 1`` coefficients, highest power first (ready for :class:`TeaCacheConfig`).

    Raises:
        ValueError: lengths differ, ``degree < 0``, fewer than ``degree + 1`` finite pairs, all input changes
            equal, fewer than ``degree + 1`` distinct input changes, or an ill-conditioned fit.
    """
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    x = np.asarray(input_changes, dtype=np.float64).reshape(-1)
    y = np.asarray(output_changes, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"input_changes ({x.size}) and output_changes ({y.size}) must have the same length")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    need = int(degree) + 1
    if x.size < need:
        raise ValueError(
            f"a degree-{degree} fit needs at least {need} finite (input, output) pairs, got {x.size}"
            f" ({int((~keep).sum())} non-finite dropped)"
        )
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

