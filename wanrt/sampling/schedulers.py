"""Flow-matching sampling schedules and solvers of Wan2.1 ("unipc", "dpm++", "euler").

Flow matching in Wan2.1 interpolates ``x_σ = (1 − σ)·x0 + σ·ε`` and the DiT predicts the
velocity ``v ≈ ε − x0``, so the data prediction is ``x0_pred = x − σ·v``. Sampling integrates
``dx/dσ = v(x, σ)`` from σ ≈ 1 down to σ = 0 on a shifted grid ``σ' = sσ / (1 + (s − 1)σ)``.

This module has two layers:

* schedules, pure functions of ``(num_steps, shift)``: :func:`shift_sigmas`,
  :func:`unipc_sigmas`, :func:`dpm_sigmas`, :func:`euler_sigmas`;
* solvers with one interface, built by :func:`make_solver`. A solver precomputes its
  per-step scalar coefficients on the host when it is built (the "plan"); ``step`` then only
  does elementwise tensor math on the sample, with the few tensors a multistep method must
  remember held in an explicit :class:`SolverState`.

``step`` allocates nothing after the first call: it writes with ``out=`` / in-place ops into
device buffers the solver owns (:class:`SolverBuffers`, in ``solver.state.buffers``), allocated
by the first step on the sample's device and again only when a new trajectory (step 0) brings
another shape, dtype or device. The tensor ``step`` returns is one of two alternating output
buffers: it stays valid until the step after next overwrites it, so ``x = solver.step(v, i, x)``
is safe, but a caller that keeps the latents of a step longer (a preview callback, the final
result when the solver is reused) must ``clone()`` them. The inputs are never modified.

The denoising loop::

    solver = make_solver("unipc", num_steps=50, shift=5.0)
    for i, t in enumerate(solver.timesteps):   # t: int64 timestep fed to the DiT
        v = cfg(model(x, t))                    # velocity, same shape as x
        x = solver.step(v, i, x)                # i == 0 starts a fresh trajectory
    result = x.clone()                          # x is a solver buffer, reused by the next run

Numerics follow the official Wan2.1 modules (``wan/utils/fm_solvers_unipc.py``,
``wan/utils/fm_solvers.py``): schedules are built in float64 and stored as float32 sigmas and
truncated int64 timesteps; the per-step scalars are evaluated in float32 with the same
operations in the same order, and the sample update is done with the same elementwise
operations, so with float32 samples the result matches the official schedulers (and
diffusers' ``UniPCMultistepScheduler`` / ``DPMSolverMultistepScheduler`` driven with the same
sigmas) to the last bit or within float32 rounding. The buffered update keeps those operations
and their order (``x − σ·v`` is ``mul`` then ``sub``, not a fused ``sub(alpha=σ)``, which rounds
differently on CPU), so it is bit-identical to the plain tensor expressions.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "SOLVER_NAMES",
    "DPMSolver",
    "EulerSolver",
    "LCMSolver",
    "Solver",
    "SolverBuffers",
    "SolverState",
    "UniPCSolver",
    "custom_schedule",
    "dpm_sigmas",
    "euler_sigmas",
    "make_solver",
    "shift_sigmas",
    "unipc_sigmas",
]

NUM_TRAIN_TIMESTEPS = 1000
"""Training timesteps of Wan2.1; ``t = σ·1000`` truncated to an integer."""

SOLVER_NAMES: tuple[str, ...] = ("unipc", "dpm++", "euler", "lcm")
"""Names accepted by :func:`make_solver`."""


# --------------------------------------------------------------------------- validation


def _check_num_steps(num_steps: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return int(num_steps)


def _check_shift(shift: float) -> float:
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real):
        raise TypeError(f"shift must be a real number, got {type(shift).__name__}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    return float(shift)


# --------------------------------------------------------------------------- schedules


def shift_sigmas(sigmas, shift: float):
    """Applies the flow-matching timestep shift ``σ' = s·σ / (1 + (s − 1)·σ)``.

    The map fixes 0 and 1, is increasing in σ, and for ``s > 1`` moves every interior σ
    towards 1 (more steps at high noise). ``s = 1`` is the identity.

    Args:
        sigmas: noise levels in [0, 1]; a tensor of any shape (computed in its dtype), a
            Python float, or anything else supporting ``*``, ``+`` and ``/`` with floats
            (a NumPy array).
        shift: the shift ``s``; a finite number > 0.

    Returns:
        The shifted sigmas, same type, shape and dtype as ``sigmas``.

    Raises:
        TypeError: ``shift`` is not a real number.
        ValueError: ``shift`` is not finite or not > 0.

    Source: ``shift * sigma / (1 + (shift - 1) * sigma)`` in Wan2.1
    ``FlowUniPCMultistepScheduler.set_timesteps`` and ``fm_solvers.get_sampling_sigmas``
    (SD3, arXiv:2403.03206, eq. 23).
    """
    shift = _check_shift(shift)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _linspace_f64(start: float, stop: float, num: int) -> torch.Tensor:
    """``numpy.linspace(start, stop, num)`` bit for bit, in float64 torch.

    NumPy evaluates ``i·step + start`` with ``step = (stop − start)/(num − 1)`` and then sets
    the last element to ``stop``; ``torch.linspace`` uses another formula for the second
    half, which can differ by an ulp and change a truncated timestep.
    """
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    y = torch.arange(num, dtype=torch.float64) * step + start
    y[-1] = stop
    return y


def _finish_schedule(shifted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 shifted sigmas [n] -> (float32 sigmas [n+1] ending in 0, int64 timesteps [n])."""
    timesteps = (shifted * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncation toward 0
    sigmas = torch.cat([shifted, shifted.new_zeros(1)]).to(torch.float32)
    return sigmas, timesteps


def _unipc_sigma_max() -> float:
    # Official training grid: σ = 1 − linspace(1, 1/1000, 1000)[::-1], stored as float32,
    # so σ_max = float32(1 − 1/1000) = 0.99900001287... and σ_min = 0.
    return torch.tensor(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32).item()


def unipc_sigmas(num_steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule of Wan2.1's default sampler, ``FlowUniPCMultistepScheduler``.

    ``σ_i = linspace(σ_max, 0, n + 1)[:-1]`` with ``σ_max = float32(0.999)``, then
    ``σ'_i = shift_sigmas(σ_i, shift)`` in float64, then a final 0 is appended and the
    sigmas are stored as float32; ``t_i = int64(σ'_i · 1000)`` (truncated, from the float64
    values). 50 steps at shift 5 give ``t = 999, 995, 991, 987, …, 302, 241, 172, 92``.

    Args:
        num_steps: number of denoising steps ``n`` (model evaluations), >= 1.
        shift: the sampling shift ``s`` (Wan2.1: 5.0 for T2V 14B, 8.0 for 1.3B at 480p,
            3.0 for 480p I2V, …), finite and > 0.

    Returns:
        ``(sigmas, timesteps)``: float32 tensor [n + 1] decreasing from ``σ'_0 < 1`` to
        ``σ'_n = 0``, and int64 tensor [n] of the timesteps fed to the DiT. Both on CPU.

    Raises:
        TypeError: ``num_steps`` is not an int or ``shift`` not a real number.
        ValueError: ``num_steps < 1`` or ``shift`` not finite and > 0.

    Source: Wan2.1 ``wan/utils/fm_solvers_unipc.py``, ``__init__`` (shift=1) followed by
    ``set_timesteps(n, shift=s)``.
    """
    num_steps = _check_num_steps(num_steps)
    shift = _check_shift(shift)
    base = _linspace_f64(_unipc_sigma_max(), 0.0, num_steps + 1)[:-1]  # float64 [n]
    return _finish_schedule(shift_sigmas(base, shift))


def euler_sigmas(num_steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Euler schedule: identical to :func:`unipc_sigmas` (same args, returns, raises)."""
    return unipc_sigmas(num_steps, shift)


def dpm_sigmas(num_steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule of Wan2.1's ``'dpm++'`` sampler, ``FlowDPMSolverMultistepScheduler``.

    ``σ_i = linspace(1, 0, n + 1)[:n]`` (so ``σ_0 = 1`` exactly), ``σ'_i =
    shift_sigmas(σ_i, shift)`` in float64 (``get_sampling_sigmas``), passed as ``sigmas=`` to
    a scheduler built with shift 1 (no second shift), then a final 0 appended and stored as
    float32; ``t_i = int64(σ'_i · 1000)``, so the first timestep is 1000.

    Args:
        num_steps: number of denoising steps ``n``, >= 1.
        shift: the sampling shift ``s``, finite and > 0.

    Returns:
        ``(sigmas, timesteps)``: float32 [n + 1] from 1 to 0, and int64 [n] starting at 1000.

    Raises:
        TypeError: ``num_steps`` is not an int or ``shift`` not a real number.
        ValueError: ``num_steps < 1`` or ``shift`` not finite and > 0.

    Source: Wan2.1 ``wan/utils/fm_solvers.py`` (``get_sampling_sigmas``,
    ``retrieve_timesteps``, ``FlowDPMSolverMultistepScheduler.set_timesteps``).
    """
    num_steps = _check_num_steps(num_steps)
    shift = _check_shift(shift)
    base = _linspace_f64(1.0, 0.0, num_steps + 1)[:num_steps]
    return _finish_schedule(shift_sigmas(base, shift))


# --------------------------------------------------------------------------- float32 scalars


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR of the flow path, ``λ(σ) = log(1 − σ) − log σ`` (0-d float32).

    ``λ(1) = −inf`` and ``λ(0) = +inf``; the official code lets these infinities flow through
    (``expm1(−inf) = −1``, ``1/inf = 0``), which makes the first DPM++ step exact and the last
    step of every solver return ``x0_pred``. We keep the same arithmetic.
    """
    return torch.log(1 - sigma) - torch.log(sigma)


# --------------------------------------------------------------------------- solver interface


@dataclass
class SolverBuffers:
    """The device buffers a solver owns, reused by every step and every trajectory.

    Allocated by the first :meth:`Solver.step` with the sample's shape, device and memory
    layout, and allocated again only by a step 0 whose sample differs in shape, device or dtype
    (:meth:`Solver.reset` keeps them). They are ordinary tensors, never inference tensors, so a
    solver works inside and outside ``torch.inference_mode``. Nothing but the solver may write
    to them, and none of them may be passed to ``step`` except the last returned output.

    Attributes:
        shape: the sample shape.
        device: the sample device.
        work_dtype: the dtype of the math, float32 (float64 for float64 samples).
        out_dtype: the sample dtype, the dtype of ``outputs``.
        outputs: the two alternating output buffers (``out_dtype``); step ``i`` writes and
            returns ``outputs[i % 2]`` (``outputs[1 − i % 2]`` if an input lives in that one).
        result: work-dtype result buffer, only when ``out_dtype != work_dtype`` (the result is
            then cast-copied into ``outputs``); None otherwise, the math writes ``outputs``.
        sample_work: work-dtype copy of a lower-precision sample (None for float32/float64).
        velocity_work: work-dtype copy of a velocity whose dtype is not the work dtype.
        x0_ring: multistep solvers: the 2-slot ring of data predictions ``x0 = x − σ·v``;
            ``SolverState.x0_preds`` lists the slots that hold the current history.
        scratch: multistep solvers: one work-dtype temporary.
        last_sample: UniPC: the (corrected) sample the last predictor started from.
    """

    shape: torch.Size
    device: torch.device
    work_dtype: torch.dtype
    out_dtype: torch.dtype
    outputs: tuple[torch.Tensor, torch.Tensor]
    result: torch.Tensor | None = None
    sample_work: torch.Tensor | None = None
    velocity_work: torch.Tensor | None = None
    x0_ring: tuple[torch.Tensor, torch.Tensor] | None = None
    scratch: torch.Tensor | None = None
    last_sample: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """All allocated buffers (outputs first), e.g. to check that no step allocates."""
        found = [*self.outputs, self.result, self.sample_work, self.velocity_work]
        found += [*(self.x0_ring or ()), self.scratch, self.last_sample]
        return [t for t in found if t is not None]


@dataclass
class SolverState:
    """What a multistep solver remembers between steps; ``reset()`` forgets the history.

    Attributes:
        next_index: the step index the next ``step`` call must carry (0 after a reset).
        x0_preds: the data predictions ``x0_pred = x − σ·v`` of the last steps, oldest first
            (at most 2), in the working dtype. The entries are the slots of
            ``buffers.x0_ring`` themselves (no copies), overwritten by later steps.
        last_sample: UniPC only: the (corrected) sample the last predictor started from, the
            buffer ``buffers.last_sample`` (None before the first step of a trajectory).
        buffers: the solver's :class:`SolverBuffers` (None before the first step); kept by
            ``reset()`` for reuse.
    """

    next_index: int = 0
    x0_preds: list[torch.Tensor] = field(default_factory=list)
    last_sample: torch.Tensor | None = None
    buffers: SolverBuffers | None = None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share memory (empty tensors never do)."""
    ptr = a.untyped_storage().data_ptr()
    return ptr != 0 and ptr == b.untyped_storage().data_ptr()


class Solver:
    """Common interface of the flow-matching solvers; build them with :func:`make_solver`.

    Attributes:
        name: the solver's name in :data:`SOLVER_NAMES`.
        num_steps: number of steps ``n``.
        shift: the sampling shift.
        sigmas: float32 [n + 1] on CPU, ``σ'_0 … σ'_{n−1}, 0``.
        timesteps: int64 [n] on CPU; step ``i`` evaluates the model at ``timesteps[i]``.
        state: the explicit :class:`SolverState`, with the solver's buffers.
    """

    name: str = ""
    _uses_x0 = False  # needs the x0 ring and a scratch buffer
    _uses_last_sample = False

    def __init__(self, num_steps: int, shift: float, sigmas: torch.Tensor, timesteps: torch.Tensor):
        self.num_steps = num_steps
        self.shift = shift
        self.sigmas = sigmas
        self.timesteps = timesteps
        self.state = SolverState()
        self._sigma = sigmas.tolist()  # float32 sigmas as exact Python floats

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_steps={self.num_steps}, shift={self.shift})"

    def reset(self) -> None:
        """Forgets the trajectory (the next ``step`` must have ``i == 0``); keeps the buffers."""
        st = self.state
        st.next_index = 0
        st.x0_preds.clear()
        st.last_sample = None

    def step(self, velocity: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        """Advances ``sample`` from ``σ'_i`` to ``σ'_{i+1}`` given the model's velocity at step i.

        Steps must be taken in order ``0, 1, …, n − 1``; ``i == 0`` always starts a new
        trajectory (the state is reset), so a solver can be reused across generations.

        Buffer contract: the step allocates nothing except on the first call and at a step 0
        whose sample has another shape, dtype or device than the buffers (see
        :class:`SolverBuffers`); it writes with ``out=`` and in-place ops. The returned tensor
        is a solver-owned buffer, one of two that alternate: it stays valid until the step
        after next (step ``i + 2``, also of a later trajectory) overwrites it, so passing it
        back as ``sample`` of the next step is safe (``x = solver.step(v, i, x)``); clone it to
        keep it longer. ``velocity`` and ``sample`` are never modified; neither may be a solver
        buffer other than a returned output. Not differentiable: runs under ``torch.no_grad``.

        Args:
            velocity: the (guided) model output ``v(sample, σ'_i)`` at ``timesteps[i]``,
                same shape and device as ``sample``; any floating dtype.
            i: the step index, ``0 <= i < num_steps``.
            sample: the current latent ``x`` at ``σ'_i``, any shape, floating dtype.

        Returns:
            The latent at ``σ'_{i+1}``, same shape, dtype and device as ``sample``, in a
            solver buffer (see above). The math runs in float32 (float64 for float64 samples)
            and is cast back. At the last step (``σ'_n = 0``) every solver returns
            ``x0_pred = x − σ'_{n−1}·v``.

        Raises:
            TypeError: ``i`` is not an int, or a tensor is not floating point.
            ValueError: ``i`` is out of range or out of order, the shapes or devices differ,
                the sample's shape, dtype or device changes within a trajectory, or both
                output buffers are passed in as inputs.
        """
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"step index i must be an int, got {type(i).__name__}")
        i = int(i)
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step index {i} out of range for {self.num_steps} steps")
        if i == 0:
            self.reset()
        elif i != self.state.next_index:
            raise ValueError(
                f"{self.name}: steps must be taken in order; expected i={self.state.next_index}, got i={i}"
                " (call with i=0 or reset() to start a new trajectory)"
            )
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
        if velocity.device != sample.device:
            raise ValueError(f"velocity is on {velocity.device} but sample on {sample.device}")
        if not (sample.is_floating_point() and velocity.is_floating_point()):
            raise TypeError(f"sample and velocity must be floating point, got {sample.dtype}, {velocity.dtype}")
        with torch.no_grad():
            b = self._buffers(sample, i)
            k = i % 2
            out = b.outputs[k]
            if _same_storage(out, sample) or _same_storage(out, velocity):
                out = b.outputs[1 - k]
                if _same_storage(out, sample) or _same_storage(out, velocity):
                    raise ValueError(f"{self.name}: sample and velocity occupy both output buffers of this solver")
            x = sample if b.sample_work is None else b.sample_work.copy_(sample)
            v = velocity
            if velocity.dtype != b.work_dtype:
                if b.velocity_work is None:
                    b.velocity_work = self._empty_like(sample, b.work_dtype)
                v = b.velocity_work.copy_(velocity)
            res = out if b.result is None else b.result
            self._step(v, i, x, res)
            if res is not out:
                out.copy_(res)
        self.state.next_index = i + 1
        return out

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """Writes the work-dtype update of step ``i`` into ``out`` (no alias of ``v``, ``x``)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------- buffers

    @staticmethod
    def _empty_like(sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        with torch.inference_mode(False):  # an inference tensor could not be updated outside inference mode
            return torch.empty_like(sample, dtype=dtype)

    def _buffers(self, sample: torch.Tensor, i: int) -> SolverBuffers:
        """The buffers for ``sample``; (re)allocated on the first step or a change at step 0."""
        b = self.state.buffers
        if b is not None and b.shape == sample.shape and b.device == sample.device and b.out_dtype == sample.dtype:
            return b
        if i > 0 and b is not None:
            raise ValueError(
                f"{self.name}: the sample changed within a trajectory (shape/dtype/device "
                f"{tuple(sample.shape)}/{sample.dtype}/{sample.device}, was {tuple(b.shape)}/{b.out_dtype}/{b.device}); "
                "start a new trajectory with i=0"
            )
        work = torch.promote_types(sample.dtype, torch.float32)
        self.state.buffers = None  # let the old buffers go before allocating new ones

        def new(dtype: torch.dtype = work) -> torch.Tensor:
            return self._empty_like(sample, dtype)

        lowp = sample.dtype != work
        b = SolverBuffers(
            shape=sample.shape,
            device=sample.device,
            work_dtype=work,
            out_dtype=sample.dtype,
            outputs=(new(sample.dtype), new(sample.dtype)),
            result=new() if lowp else None,
            sample_work=new() if lowp else None,
            x0_ring=(new(), new()) if self._uses_x0 else None,
            scratch=new() if self._uses_x0 else None,
            last_sample=new() if self._uses_last_sample else None,
        )
        self.state.buffers = b
        return b

    def _x0_pred(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Writes ``x0_pred = x − σ_i·v`` into the free slot of the x0 ring and returns it.

        ``σ_i`` is the float32 sigma (official ``convert_model_output``). The free slot is the
        one not holding the newest prediction, i.e. the one holding the oldest (now dropped).
        """
        ring = self.state.buffers.x0_ring
        preds = self.state.x0_preds
        x0 = ring[1] if preds and preds[-1] is ring[0] else ring[0]
        torch.mul(v, self._sigma[i], out=x0)
        torch.sub(x, x0, out=x0)
        return x0

    def _remember(self, x0: torch.Tensor) -> None:
        preds = self.state.x0_preds
        preds.append(x0)
        if len(preds) > 2:
            del preds[0]


# --------------------------------------------------------------------------- Euler


class EulerSolver(Solver):
    """First-order Euler on the UniPC schedule: ``x_{i+1} = x_i + (σ'_{i+1} − σ'_i)·v_i``.

    ``σ'_{i+1} − σ'_i`` is taken between the float32 sigmas. Not in the official Wan2.1
    release; a reference and debugging sampler.
    """

    name = "euler"

    def __init__(self, num_steps: int, shift: float, schedule=None):
        super().__init__(num_steps, shift, *(schedule or euler_sigmas(num_steps, shift)))
        self._dt = [float(self.sigmas[k + 1] - self.sigmas[k]) for k in range(num_steps)]

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor, out: torch.Tensor) -> None:
        torch.mul(v, self._dt[i], out=out)  # x + dt·v
        out.add_(x)


# --------------------------------------------------------------------------- UniPC


@dataclass(frozen=True)
class _UniCoef:
    """Scalars of one UniP (predictor) or UniC (corrector) update from σ_s to σ_t.

    ``base = c_x·x − c_m0·m0`` with ``c_x = σ_t/σ_s``, ``c_m0 = α_t·(e^{−h} − 1)`` and
    ``c_res = α_t·B(h)``, ``B(h) = e^{−h} − 1`` (bh2), ``h = λ_t − λ_s``; ``rk`` is the
    ratio ``(λ_{s1} − λ_s)/h`` of the older point (order 2); ``rho`` are the corrector
    weights ``[ρ_1, ρ_t]`` (order 2) or ``[0.5]`` (order 1).
    """

    order: int
    c_x: float
    c_m0: float
    c_res: float
    rk: float = 0.0
    rho: tuple[float, ...] = ()


def _uni_coef(sigmas: torch.Tensor, s: int, t: int, order: int, corrector: bool) -> _UniCoef:
    """Float32 scalars of a UniPC-bh2 update between grid points ``s`` and ``t = s + 1``.

    Evaluated with the official operations in the official order (0-d float32 tensors), so
    that the coefficients are bit-identical to ``FlowUniPCMultistepScheduler``'s.
    """
    sigma_t, sigma_s = sigmas[t], sigmas[s]
    alpha_t = 1 - sigma_t
    lam_s = _lam(sigma_s)
    h = _lam(sigma_t) - lam_s
    hh = -h  # predict_x0
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)  # bh2
    c_x = float(sigma_t / sigma_s)
    c_m0 = float(alpha_t * h_phi_1)
    c_res = float(alpha_t * b_h)
    if order == 1:
        return _UniCoef(1, c_x, c_m0, c_res, rho=(0.5,) if corrector else ())
    rk = (_lam(sigmas[s - 1]) - lam_s) / h
    if not corrector:
        return _UniCoef(2, c_x, c_m0, c_res, rk=float(rk))  # UniP-2 uses ρ = 0.5
    # UniC-2: solve R ρ = b with R = [[1, 1], [rk, 1]] and b_k = k!·φ_{k+1}(−h)·(−h)/B(h)
    # (phi recursion φ_{k+1} = (φ_k − 1/k!)/hh as in the reference implementation).
    h_phi_k = h_phi_1 / hh - 1
    b1 = h_phi_k * 1 / b_h
    h_phi_k = h_phi_k / hh - 1 / 2
    b2 = h_phi_k * 2 / b_h
    rks = torch.stack([rk, _f32(1.0)])
    lhs = torch.stack([rks**0, rks**1])
    rho = torch.linalg.solve(lhs, torch.stack([b1, b2]))
    return _UniCoef(2, c_x, c_m0, c_res, rk=float(rk), rho=(float(rho[0]), float(rho[1])))


class UniPCSolver(Solver):
    """UniPC-2 with the bh2 B(h), data prediction, UniC corrector and lower-order final step.

    Per step ``i`` with ``x0_i = x_i − σ'_i·v_i`` (from the uncorrected sample the model saw):

    1. Corrector (``i >= 1``): ``x_i ← UniC(x_{i−1}, x0_{i−1}, x0_{i−2}; x0_i)`` of the order
       used by the previous predictor; ``UniC-1``: ``x_i = σ_t/σ_s·x − α_t(e^{−h}−1)·m0 −
       α_t·B(h)·½(x0_i − m0)``; ``UniC-2`` adds ``ρ_1·(m1 − m0)/r`` with ``ρ`` from a 2×2 solve.
    2. Predictor of order ``p_i = min(2, i + 1, n − i)``: ``x_{i+1} = σ_t/σ_s·x_i −
       α_t(e^{−h}−1)·x0_i − α_t·B(h)·½(x0_{i−1} − x0_i)/r`` (the last term only for
       ``p_i = 2``), ``h = λ_t − λ_s``, ``r = (λ_{i−1} − λ_i)/h``, ``B(h) = e^{−h} − 1``.

    The last step has ``σ_t = 0``, so ``λ_t = +inf`` and it returns ``x0_{n−1}`` exactly.
    ``disable_corrector`` is empty, as in Wan2.1.

    Source: Wan2.1 ``wan/utils/fm_solvers_unipc.py`` (``FlowUniPCMultistepScheduler``,
    solver_order=2, bh2, predict_x0, lower_order_final), itself diffusers'
    ``UniPCMultistepScheduler`` converted to flow matching; UniPC, Zhao et al. 2023,
    arXiv:2302.04867.
    """

    name = "unipc"
    _uses_x0 = True
    _uses_last_sample = True

    def __init__(self, num_steps: int, shift: float, schedule=None):
        super().__init__(num_steps, shift, *(schedule or unipc_sigmas(num_steps, shift)))
        n = num_steps
        orders = [min(2, k + 1, n - k) for k in range(n)]
        self._pred = [_uni_coef(self.sigmas, k, k + 1, orders[k], corrector=False) for k in range(n)]
        # the corrector at step k re-does step k − 1 with its order, now knowing x0_k
        self._corr = [None] + [_uni_coef(self.sigmas, k - 1, k, orders[k - 1], corrector=True) for k in range(1, n)]

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor, out: torch.Tensor) -> None:
        st = self.state
        b = st.buffers
        tmp, xs = b.scratch, b.last_sample
        if i == 0:
            x0 = self._x0_pred(v, i, x)
            xs.copy_(x)
        else:  # UniC on the sample the model just saw: xs <- the corrected sample
            c = self._corr[i]
            m0 = st.x0_preds[-1]
            xs.mul_(c.c_x)  # base = c_x·last_sample − c_m0·m0
            torch.mul(m0, c.c_m0, out=tmp)
            xs.sub_(tmp)
            if c.order == 2:
                # ρ_1·d1 with d1 = (m1 − m0)/rk, in `out` (free until the predictor), before the new
                # x0 overwrites m1's slot of the ring
                torch.sub(st.x0_preds[-2], m0, out=out)
                out.div_(c.rk)
                out.mul_(c.rho[0])
            x0 = self._x0_pred(v, i, x)
            torch.sub(x0, m0, out=tmp)  # d1_t
            if c.order == 1:
                tmp.mul_(c.rho[0])  # base − c_res·(ρ·d1_t)
                tmp.mul_(c.c_res)
                xs.sub_(tmp)
            else:
                tmp.mul_(c.rho[1])  # base − c_res·(ρ_1·d1 + ρ_t·d1_t)
                out.add_(tmp)
                out.mul_(c.c_res)
                xs.sub_(out)
        self._remember(x0)
        st.last_sample = xs
        p = self._pred[i]
        torch.mul(xs, p.c_x, out=out)  # c_x·x − c_m0·x0
        torch.mul(x0, p.c_m0, out=tmp)
        out.sub_(tmp)
        if p.order == 2:
            torch.sub(st.x0_preds[-2], x0, out=tmp)  # − c_res·(0.5·(x0_{i−1} − x0_i)/rk)
            tmp.div_(p.rk)
            tmp.mul_(0.5)
            tmp.mul_(p.c_res)
            out.sub_(tmp)


# --------------------------------------------------------------------------- DPM-Solver++


@dataclass(frozen=True)
class _DPMCoef:
    """Scalars of one DPM-Solver++ step: ``x' = c_x·x − c_d0·D0 − c_half·(c_d1·(m0 − m1))``."""

    order: int
    c_x: float
    c_d0: float
    c_half: float = 0.0
    c_d1: float = 0.0


def _dpm_coef(sigmas: torch.Tensor, s: int, order: int) -> _DPMCoef:
    """Float32 scalars of the DPM-Solver++ (midpoint) step from grid point ``s`` to ``s + 1``."""
    sigma_t, sigma_s = sigmas[s + 1], sigmas[s]
    alpha_t = 1 - sigma_t
    lam_s = _lam(sigma_s)
    h = _lam(sigma_t) - lam_s
    c_x = sigma_t / sigma_s
    c_d0 = alpha_t * (torch.exp(-h) - 1.0)
    if order == 1:
        return _DPMCoef(1, float(c_x), float(c_d0))
    r0 = (lam_s - _lam(sigmas[s - 1])) / h
    # σ_0 = 1 gives λ = −inf, r0 = inf and c_d1 = 0: the second step is first order, as in
    # the official scheduler.
    return _DPMCoef(2, float(c_x), float(c_d0), float(0.5 * c_d0), float(1.0 / r0))


class DPMSolver(Solver):
    """Multistep DPM-Solver++(2M), midpoint form, data prediction, first-order final step.

    With ``D0 = x0_i = x_i − σ'_i·v_i``, ``h = λ_{i+1} − λ_i``, ``r = (λ_i − λ_{i−1})/h``:
    ``x_{i+1} = σ_{i+1}/σ_i·x_i − α_{i+1}(e^{−h} − 1)·D0 − ½·α_{i+1}(e^{−h} − 1)·(x0_i −
    x0_{i−1})/r``; the last term is dropped at step 0 and at the last step (final σ = 0, which
    then returns ``x0_{n−1}``). Because ``σ_0 = 1`` (``λ_0 = −inf``), step 1 is also first
    order in effect (``1/r = 0``), exactly as in the official code.

    Source: Wan2.1 ``wan/utils/fm_solvers.py`` (``FlowDPMSolverMultistepScheduler``,
    algorithm_type='dpmsolver++', solver_order=2, solver_type='midpoint', lower_order_final,
    final_sigmas_type='zero'); DPM-Solver++, Lu et al. 2022, arXiv:2211.01095.
    """

    name = "dpm++"
    _uses_x0 = True

    def __init__(self, num_steps: int, shift: float, schedule=None):
        super().__init__(num_steps, shift, *(schedule or dpm_sigmas(num_steps, shift)))
        n = num_steps
        self._coef = [_dpm_coef(self.sigmas, k, 1 if k in (0, n - 1) else 2) for k in range(n)]

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor, out: torch.Tensor) -> None:
        tmp = self.state.buffers.scratch
        x0 = self._x0_pred(v, i, x)
        self._remember(x0)
        c = self._coef[i]
        torch.mul(x, c.c_x, out=out)  # c_x·x − c_d0·D0
        torch.mul(x0, c.c_d0, out=tmp)
        out.sub_(tmp)
        if c.order == 2:
            torch.sub(x0, self.state.x0_preds[-2], out=tmp)  # − c_half·(c_d1·(x0_i − x0_{i−1}))
            tmp.mul_(c.c_d1)
            tmp.mul_(c.c_half)
            out.sub_(tmp)


# --------------------------------------------------------------------------- factory

class LCMSolver(Solver):
    """The sampler of consistency-style distillations (CausVid, Self-Forcing, rCM; "lcm" in the ComfyUI wrappers):
    predict ``x0 = x_i − σ'_i·v_i``, then re-noise it to the next sigma with fresh noise,
    ``x_{i+1} = (1 − σ'_{i+1})·x0 + σ'_{i+1}·ε_i``; the last step returns ``x0``.

    ``ε_i`` is drawn on the CPU from a generator seeded with ``seed + 1`` (the initial noise uses ``seed``), then
    moved to the sample's device, so a seed gives the same video on every device. Schedule: as Euler's (or a
    custom one).

    Source: the multistep consistency sampling of Song et al. 2023 (arXiv:2303.01469, Algorithm 1), written for
    the flow path ``x_σ = (1 − σ)·x0 + σ·ε``.
    """

    name = "lcm"
    _uses_x0 = True  # its scratch buffer holds the fresh noise on the device

    def __init__(self, num_steps: int, shift: float, schedule=None, seed: int = 0):
        super().__init__(num_steps, shift, *(schedule or euler_sigmas(num_steps, shift)))
        self.seed = int(seed)
        self._gen: torch.Generator | None = None
        self._host_noise: torch.Tensor | None = None  # the CPU draw

    def reset(self) -> None:
        super().reset()
        self._gen = torch.Generator("cpu").manual_seed((self.seed + 1) % 2**63)

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor, out: torch.Tensor) -> None:
        torch.mul(v, self._sigma[i], out=out)  # x0 = x − σ_i·v
        torch.sub(x, out, out=out)
        nxt = self._sigma[i + 1]
        if nxt == 0:
            return
        noise = self.state.buffers.scratch
        host = self._host_noise  # drawn contiguous on the CPU (the same numbers on every device and layout)
        if host is None or host.shape != noise.shape or host.dtype != noise.dtype:
            with torch.inference_mode(False):
                host = self._host_noise = torch.empty(noise.shape, dtype=noise.dtype)
        torch.randn(noise.shape, generator=self._gen, dtype=noise.dtype, out=host)
        noise.copy_(host)
        noise.mul_(nxt)  # (1 − σ')·x0 + σ'·ε, each product rounded, then the sum
        out.mul_(1 - nxt).add_(noise)


def custom_schedule(*, timesteps=None, sigmas=None, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A schedule given by its steps, as the few-step distilled models expect.

    * ``timesteps``: ``n`` values on the 0..1000 scale, decreasing, ``t_0 <= 1000``: ``σ_i = t_i / 1000``, shifted
      (:func:`shift_sigmas`) like the default schedules; LightX2V's 4-step recipe is ``[1000, 750, 500, 250]`` at
      shift 5 (the model then sees ``t = 1000, 937.5, 833.3, 625``).
    * ``sigmas``: ``n`` values in (0, 1], decreasing, used as they are (no shift).

    Returns:
        ``(sigmas, timesteps)``: float32 ``[n + 1]`` ending in 0, and float64 ``[n]`` ``= σ'·1000`` (not
        truncated: the distilled models were trained at these exact times).

    Raises:
        ValueError: both or neither given, an empty list, values out of range, not strictly decreasing, not finite.
    """
    if (timesteps is None) == (sigmas is None):
        raise ValueError("give either timesteps or sigmas")
    values, name, top = (timesteps, "timesteps", float(NUM_TRAIN_TIMESTEPS)) if timesteps is not None else \
        (sigmas, "sigmas", 1.0)
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not vals or len(vals) > 1000:
        raise ValueError(f"{name} must hold 1 to 1000 values, got {len(vals)}")
    if any(not math.isfinite(v) or not 0 < v <= top for v in vals):
        raise ValueError(f"{name} must lie in (0, {top:g}], got {vals}")
    if any(a <= b for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be strictly decreasing, got {vals}")
    base = torch.tensor(vals, dtype=torch.float64)
    shifted = shift_sigmas(base / NUM_TRAIN_TIMESTEPS, shift) if timesteps is not None else base
    return torch.cat([shifted, shifted.new_zeros(1)]).to(torch.float32), shifted * NUM_TRAIN_TIMESTEPS


_SOLVERS: dict[str, type[Solver]] = {"unipc": UniPCSolver, "dpm++": DPMSolver, "euler": EulerSolver,
                                     "lcm": LCMSolver}


def make_solver(name: str, num_steps: int, shift: float, *, schedule=None, seed: int = 0) -> Solver:
    """Builds a flow-matching solver by name.

    Args:
        name: one of :data:`SOLVER_NAMES`: ``"unipc"`` (Wan2.1 default), ``"dpm++"``, ``"euler"``, ``"lcm"``
            (few-step distillations: predict x0, re-noise).
        num_steps: number of denoising steps (model evaluations), >= 1.
        shift: sampling shift, finite and > 0.
        schedule: ``(sigmas float32 [n + 1], timesteps [n])`` from :func:`custom_schedule` instead of the
            solver's own; ``n`` must be ``num_steps``.
        seed: the request's seed (``lcm`` draws its fresh noise from ``seed + 1``).

    Returns:
        A fresh :class:`Solver` with ``timesteps`` (int64 [n], float64 for a custom schedule), ``sigmas``
        (float32 [n + 1]) and ``step(velocity, i, sample)``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), ``num_steps < 1``,
            ``shift`` not finite and > 0, or a schedule of another length.
        TypeError: ``num_steps`` not an int or ``shift`` not a real number.
    """
    try:
        cls = _SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; valid names: {', '.join(SOLVER_NAMES)}") from None
    num_steps, shift = _check_num_steps(num_steps), _check_shift(shift)
    if schedule is not None and len(schedule[1]) != num_steps:
        raise ValueError(f"the schedule has {len(schedule[1])} steps, num_steps is {num_steps}")
    if cls is LCMSolver:
        return cls(num_steps, shift, schedule, seed)
    return cls(num_steps, shift, schedule)
