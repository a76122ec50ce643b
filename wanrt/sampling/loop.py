"""One denoising step's model evaluation: classifier-free guidance over the DiT, with the two branches
batched, TeaCache step skipping and CUDA-graph replay.

The official loop (``wan/text2video.py``; docs/model-reference.md §6.6) runs two batch-1 DiT passes
per step and combines them as ``v = v_u + g·(v_c − v_u)``. :class:`GuidedStep` computes the same
velocity, with three independent options:

* ``batch_cfg``: both branches in one batch-2 forward (equal to two passes within float tolerance).
* ``teacache``: a :class:`~wanrt.cache.teacache.TeaCache` decides per branch, on the host, whether
  the blocks run; a skipped branch adds the residual cached at its last computed step.
* ``graphs``: a :class:`~wanrt.graph.cuda_graphs.StepGraphs` replays the computed forward from a
  CUDA graph captured once per (shape, batch, backend, dtype, residual) key. Decisions stay outside.

Work outside the DiT writes into buffers owned by the step (the guided velocity is a ``torch.lerp``
into one), so the loop allocates nothing per step beyond a scalar for the NaN check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..models.dit import WanDiT

BRANCHES = ("cond", "uncond")

#: ``recorder(branch, step, modulated_input, velocity)``: what ``wanrt calibrate-teacache`` records.
Recorder = Callable[[str, int, torch.Tensor, torch.Tensor], None]


class GuidedStep:
    """The guided velocity of one denoising step.

    Args:
        model: The DiT (its ``plan`` selects the kernels).
        cond: Conditional text embeddings ``[1, L_c, text_dim]`` on the model's device.
        uncond: Unconditional (negative) embeddings ``[1, L_u, text_dim]``, or None when CFG is off
            (guidance scale 1).
        guidance_scale: CFG scale ``g``.
        batch_cfg: Run both branches in one batch-2 forward.
        teacache: Step cache (``reset()`` is the caller's job between videos), or None.
        graphs: the :class:`StepGraphSet` of :func:`make_step_graphs` wrapping :func:`computed_forward`, or None
            (eager).
        recorder: Called per branch and step with the modulated input and the branch's velocity.
        y: i2v/flf2v: the conditioning ``[1, 20, F, H, W]`` (mask 4 + VAE latent 16), shared by both branches
            (only the text differs between them, ``docs/model-reference.md`` §7.9).
        clip_fea: i2v/flf2v with CLIP: CLIP features ``[1, 257 or 514, image_dim]``, shared by both branches
            (Wan2.2's CLIP-less i2v takes ``y`` alone).
        vace_context: vace: the hint-stream input ``[1, 96, F, H, W]``, shared by both branches (official
            ``vace.py`` gives the same ``vace_context`` to the conditional and unconditional passes).
        vace_scale: vace: float32 conditioning scale per VACE block ``[len(vace_layers)]``.
        token_mask: Wan2.2 TI2V image-to-video: ``[L]`` float64, 0 for the tokens of the fixed first latent frame
            and 1 elsewhere; the DiT then gets per-token timesteps ``t * token_mask`` (``[n, L]``; official
            ``textimage2video.py``: ``mask2[0][0][:, ::2, ::2] * t``). None: one timestep per sample.

    Raises:
        ValueError: conditioning the model does not take (or lacks), embeddings of the wrong shape (the DiT's
            own checks).
    """

    def __init__(self, model: WanDiT, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float, *,
                 batch_cfg: bool = False, teacache=None, graphs=None, recorder: Recorder | None = None,
                 y: torch.Tensor | None = None, clip_fea: torch.Tensor | None = None,
                 vace_context: torch.Tensor | None = None, vace_scale: torch.Tensor | None = None,
                 token_mask: torch.Tensor | None = None):
        given = {"y": y, "clip_fea": clip_fea, "vace_context": vace_context, "vace_scale": vace_scale}
        names = shared_inputs(model.config)
        extra = sorted(k for k, v in given.items() if v is not None and k not in names)
        missing = [k for k in names if given[k] is None]
        if extra or missing:
            raise ValueError(f"a {model.config.model_type} model takes {list(names) or 'no conditioning'} "
                             f"besides the text; got {extra} it does not take" if extra else
                             f"a {model.config.model_type} model needs {missing}")
        self.model = model
        self.shared = tuple(given[k] for k in names)
        self.guidance_scale = float(guidance_scale)
        self.branches = BRANCHES if uncond is not None else BRANCHES[:1]
        text_len = model.config.text_len
        # Zero-pad each prompt to text_len (what the DiT does itself) so the branches stack.
        ctx = [F.pad(c, (0, 0, 0, text_len - c.shape[1])) for c in (cond, uncond) if c is not None]
        self.context = torch.cat(ctx, dim=0)  # [n_branches, text_len, text_dim]
        self.batch_cfg = bool(batch_cfg) and len(self.branches) == 2
        self.teacache = teacache
        self.graphs = graphs
        self.recorder = recorder
        self._out: torch.Tensor | None = None  # the guided velocity buffer
        self._kept: dict[str, torch.Tensor] = {}  # per-branch copies of graph outputs
        self._t: torch.Tensor | None = None  # timestep buffer
        self.token_mask = token_mask

    # ------------------------------------------------------------------ the model calls
    def _image(self, batch: int) -> tuple[torch.Tensor, ...]:
        """The shared conditioning (:func:`shared_inputs`) for a batch of ``batch`` branches (views), or ()."""
        names = shared_inputs(self.model.config)
        return tuple(c if n in _UNBATCHED else c.expand(batch, *c.shape[1:]) for n, c in zip(names, self.shared))

    def _computed(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        with_residual = self.teacache is not None
        image = self._image(x.shape[0])
        if self.graphs is None or t.dim() > 1:  # per-token timesteps run eager: their distinct values are host reads
            return computed_forward(self.model, x, t, context, with_residual, *image)
        key = (*graph_key(self.model, x, context, *image), tuple(t.shape))
        if with_residual:
            return self.graphs.with_residual(key, x, t, context, *image)
        return self.graphs.plain(key, x, t, context, *image), None

    def _keep(self, branch: str, v: torch.Tensor) -> torch.Tensor:
        """Copy a graph output (a static buffer the next replay overwrites) into the branch's own buffer."""
        buf = self._kept.get(branch)
        if buf is None or buf.shape != v.shape:
            buf = self._kept[branch] = torch.empty_like(v)
        return buf.copy_(v)

    def _skipped(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 residual: torch.Tensor) -> torch.Tensor:
        """A skipped step: the blocks' output is the input plus the cached residual."""
        m = self.model
        image = dict(zip(shared_inputs(m.config), self._image(x.shape[0])))
        inp = m.prepare(x, t, context, **image)
        return m.run_head(inp, inp.x.float() + residual)[0]

    # ------------------------------------------------------------------ one step
    def __call__(self, x: torch.Tensor, t: float | torch.Tensor, step: int) -> torch.Tensor:
        """Guided velocity ``[1, C, F, H, W]`` float32 at timestep ``t`` (step index ``step``).

        ``t`` is a number, or per token a tensor ``[L]`` (or ``[1, L]``) over the video tokens (Wan2.2 TI2V: 0 on
        the first latent frame's tokens; :meth:`WanDiT.forward`); per-token timesteps run without CUDA graphs.
        The result is a buffer owned by this object, overwritten by the next call.
        """
        m, n = self.model, len(self.branches)
        if self.token_mask is not None and not isinstance(t, torch.Tensor):  # [L]: the fixed frame's tokens at 0
            t = self.token_mask.to(x.device, torch.float64) * t  # (a no-op move when made on the device)
        if isinstance(t, torch.Tensor) and t.numel() > 1:  # per-token timesteps, the same for both branches
            tt = t.to(device=x.device, dtype=torch.float64).reshape(1, -1).expand(n, -1)  # [n, L]
        else:
            if self._t is None or self._t.device != x.device:
                self._t = torch.empty(n, device=x.device, dtype=torch.float64)  # exact for int and float t
            tt = self._t.fill_(t)  # [n], the step's timestep for each branch
        compute = {b: True for b in self.branches}
        mod_inputs: dict[str, torch.Tensor] = {}
        if self.teacache is not None or self.recorder is not None:
            # the branches share t: one embedding (per-token t: the token-weighted distinct values, WanDiT.time_embeddings)
            e, e0 = m.time_embeddings(tt[:1], 1, x.device)
            if self.teacache is not None:
                mode = self.teacache.config.mode
            else:
                mode = getattr(self.recorder, "mode", "e")
            mod = e if mode == "e" else e0
            mod_inputs = {b: mod for b in self.branches}
            if self.teacache is not None:
                compute = {b: self.teacache.should_compute(b, step, mod) for b in self.branches}

        velocities: dict[str, torch.Tensor] = {}
        todo = [b for b in self.branches if compute[b]]
        if self.batch_cfg and len(todo) == 2:
            xb = x.expand(2, *x.shape[1:])  # [2, 16, F, H, W] (a view; the DiT reads it)
            v, res = self._computed(xb, tt, self.context)
            velocities = {"cond": v[0:1], "uncond": v[1:2]}
            if res is not None:
                self.teacache.store("cond", res[0:1])
                self.teacache.store("uncond", res[1:2])
        else:
            for b in todo:
                i = self.branches.index(b)
                v, res = self._computed(x, tt[:1], self.context[i:i + 1])
                velocities[b] = self._keep(b, v) if self.graphs is not None else v
                if res is not None:
                    self.teacache.store(b, res)
        for b in self.branches:
            if not compute[b]:
                i = self.branches.index(b)
                velocities[b] = self._skipped(x, tt[:1], self.context[i:i + 1], self.teacache.residual(b))
        if self.recorder is not None:
            for b in self.branches:
                self.recorder(b, step, mod_inputs[b], velocities[b])

        if self._out is None or self._out.shape != x.shape:
            self._out = torch.empty_like(x, dtype=torch.float32)
        if n == 1:
            return self._out.copy_(velocities["cond"])
        # v_u + g·(v_c − v_u), written into the step's buffer.
        return torch.lerp(velocities["uncond"], velocities["cond"], self.guidance_scale, out=self._out)



class ExpertStep:
    """Wan2.2 A14B: the step of the expert whose timesteps these are (official ``text2video.py``,
    ``_prepare_model_for_timestep``): the high-noise expert while ``t >= boundary * 1000``, then the low-noise one.

    Each expert's step (a :class:`GuidedStep` with its own guidance scale, TeaCache state and CUDA graphs) sees its
    own step indices from 0, so a TeaCache warms up, keeps its residuals and computes its last step per expert.

    Args:
        steps: ``(high, low)`` step callables ``step(x, t, i)``.
        timesteps: the solver's timesteps (0..1000), in order.
        boundary: the switch as a fraction of 1000 (0: the high-noise expert only; 1: the low-noise one only).
        activate: called with 0 (high) or 1 (low) before the first step of each expert (e.g.
            :meth:`wanrt.offload.experts.ExpertSwap.activate`), or None.

    Attributes:
        counts: ``(high, low)`` steps each expert runs.
    """

    def __init__(self, steps, timesteps, boundary: float, activate: Callable[[int], None] | None = None):
        self.steps = tuple(steps)
        self.expert_of = experts_of(timesteps, boundary)
        self.counts = (self.expert_of.count(0), self.expert_of.count(1))
        self.first = (0, self.counts[0])
        self.activate = activate

    def __call__(self, x: torch.Tensor, t: float, step: int) -> torch.Tensor:
        e = self.expert_of[step]
        local = step - self.first[e]
        if local == 0 and self.activate is not None:
            self.activate(e)
        return self.steps[e](x, t, local)


def experts_of(timesteps, boundary: float) -> list[int]:
    """The expert of each timestep (0..1000): 0 (high noise) while ``t >= boundary * 1000``, then 1 (low noise)."""
    threshold = float(boundary) * 1000
    return [0 if float(t) >= threshold else 1 for t in timesteps]


def expert_counts(timesteps, boundary: float) -> tuple[int, int]:
    """``(high, low)``: how many of ``timesteps`` each A14B expert runs (:func:`experts_of`)."""
    of = experts_of(timesteps, boundary)
    return of.count(0), of.count(1)


class KeepFrames:
    """A solver whose update keeps the first latent frames fixed (Wan2.2 TI2V image-to-video: official
    ``textimage2video.py`` sets ``latent = (1 - mask2) * z + mask2 * latent`` after every step, mask2 0 on the
    first latent frame; with a 0/1 mask that is exactly writing ``z`` there).

    Args:
        solver: from :func:`wanrt.sampling.make_solver`.
        fixed: ``[1, C, n, H, W]``: the first ``n`` latent frames to keep.
    """

    def __init__(self, solver, fixed: torch.Tensor):
        self.solver = solver
        self.fixed = fixed
        self.timesteps = solver.timesteps

    def __getattr__(self, name):
        return getattr(self.solver, name)

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self.solver.step(v, i, x)
        out[:, :, : self.fixed.shape[2]] = self.fixed
        return out


def denoise(step: Callable[[torch.Tensor, int, int], torch.Tensor], solver, x: torch.Tensor, *, seed: int | None = None,
            callback: Callable[[int, int, torch.Tensor], bool | None] | None = None, cancel=None,
            progress: bool = False, sync: Callable[[bool, bool], tuple[bool, bool]] | None = None) -> torch.Tensor:
    """The denoising loop: for each of the solver's timesteps, the velocity ``step(x, t, i)`` (e.g. a
    :class:`GuidedStep`), a non-finite check, and the solver's update of ``x``.

    Args:
        step: the model evaluation, ``[1, 16, F, H, W]`` float32 velocity at timestep ``t`` (step index ``i``).
        solver: from :func:`wanrt.sampling.make_solver` (``timesteps``, ``step(v, i, x)``).
        x: the initial noise ``[1, 16, F, H, W]`` float32 on the model's device.
        seed: reported on :class:`~wanrt.request.Cancelled`.
        callback: ``callback(i, num_steps, x)`` after each step; returning False cancels.
        cancel: a ``threading.Event`` checked before the first step and after each.
        progress: a tqdm bar.
        sync: ``sync(nonfinite, stop) -> (nonfinite, stop)`` makes the ranks of a parallel run agree on the NaN
            check and the stop, once before the first step and once per step (:class:`wanrt.parallel.step.RankSync`).

    Returns:
        The denoised latents (a solver buffer on the device).

    Raises:
        FloatingPointError: the velocity holds NaN/Inf (names the step and timestep).
        Cancelled: with the step reached and a CPU copy of the latents at that point.
    """
    from tqdm.auto import tqdm

    from ..request import Cancelled

    def stop(i: int) -> Cancelled:
        return Cancelled(i, x.detach().to("cpu", torch.float32, copy=True), seed)

    def agreed(nonfinite: bool, halt: bool) -> tuple[bool, bool]:
        return (nonfinite, halt) if sync is None else sync(nonfinite, halt)

    if agreed(False, cancel is not None and cancel.is_set())[1]:
        raise stop(-1)
    timesteps = solver.timesteps.tolist()
    bar = tqdm(total=len(timesteps), disable=not progress, desc="denoise", unit="step")
    try:
        for i, t in enumerate(timesteps):
            v = step(x, t, i)  # an int (the default schedules) or a float (a custom one)
            nonfinite = not torch.isfinite(v.sum())  # a NaN/Inf anywhere makes the sum non-finite
            halt = False
            if not nonfinite:
                x = solver.step(v, i, x)
                bar.update(1)
                halt = (callback is not None and callback(i, len(timesteps), x) is False) or \
                    (cancel is not None and cancel.is_set())
            nonfinite, halt = agreed(nonfinite, halt)
            if nonfinite:
                raise FloatingPointError(f"the DiT produced NaN/Inf at step {i} (timestep {t})")
            if halt:
                raise stop(i)
    finally:
        bar.close()
    return x


#: The shared inputs that are not per sample (no batch dimension to expand).
_UNBATCHED = frozenset({"vace_scale"})


def shared_inputs(config) -> tuple[str, ...]:
    """The DiT inputs besides ``x``, ``t`` and ``context`` that a model type takes, in the positional order of
    :func:`computed_forward` and the step graphs: ``("y", "clip_fea")`` (i2v/flf2v), ``("y",)`` (Wan2.2's i2v
    without CLIP), ``("vace_context", "vace_scale")`` (vace) or ``()``."""
    if config.has_image_input:
        return ("y", "clip_fea") if config.has_clip else ("y",)
    if config.has_vace:
        return ("vace_context", "vace_scale")
    return ()


def computed_forward(model: WanDiT, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     with_residual: bool, *shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The DiT forward of a computed step: velocity ``[B, 16, F, H, W]`` float32 and, for the step
    cache, the blocks' residual ``[B, S, dim]`` float32 (``None`` without ``with_residual``).
    ``shared`` are the model type's other inputs (:func:`shared_inputs`: the image conditioning of i2v/flf2v,
    the hint stream of vace; see :meth:`WanDiT.forward`)."""
    inp = model.prepare(x, t, context, **dict(zip(shared_inputs(model.config), shared, strict=True)))
    xo, pending = model.run_blocks(inp)
    v, out = model.run_head(inp, xo, pending)
    return v, (out - inp.x.float()) if with_residual else None


def refuse_token_timesteps(t: torch.Tensor) -> None:
    """Raise ValueError for per-token timesteps ``t [B, L]``: a captured step cannot run them (the distinct values
    of ``t`` are found on the host and decide the shapes of the time embedding, which a replay would freeze)."""
    if isinstance(t, torch.Tensor) and t.ndim > 1:
        raise ValueError(f"per-token timesteps (t of shape {tuple(t.shape)}) cannot run in a CUDA graph: their "
                         "distinct values are read on the host and shape the time embedding; run this model "
                         "without step graphs (cuda_graphs off)")


def graph_key(model: WanDiT, x: torch.Tensor, context: torch.Tensor, *image: torch.Tensor) -> tuple:
    """What a captured step depends on: shapes (batch included; the image conditioning's too), the backends
    and the weights' dtype."""
    from ..models.dit import compute_dtype

    dtype = compute_dtype(model.blocks[0].self_attn.q) if len(model.blocks) else model.head.head.weight.dtype
    return (tuple(x.shape), tuple(context.shape), *(tuple(c.shape) for c in image), model.plan, dtype)


class StepGraphSet(NamedTuple):
    """The two CUDA-graph wrappers of a DiT step: ``plain`` (velocity only) and ``with_residual`` (velocity and
    the blocks' residual, for TeaCache), each a :class:`~wanrt.graph.cuda_graphs.StepGraphs` LRU of shapes."""

    plain: object
    with_residual: object

    def stats(self) -> dict[str, dict]:
        """``{"plain": {...}, "with_residual": {...}}``: captures, replays, evictions, fallbacks, eager calls."""
        return {"plain": dict(self.plain.stats), "with_residual": dict(self.with_residual.stats)}


def make_step_graphs(model: WanDiT, max_graphs: int = 4, capturer=None) -> StepGraphSet:
    """The :class:`StepGraphSet` capturing :func:`computed_forward` of ``model`` (one wrapper per output
    signature, each an LRU of at most ``max_graphs`` shapes)."""
    from ..graph.cuda_graphs import StepGraphs

    def with_res(x, t, context, *image):
        refuse_token_timesteps(t)
        return computed_forward(model, x, t, context, True, *image)

    def without_res(x, t, context, *image):
        refuse_token_timesteps(t)
        return computed_forward(model, x, t, context, False, *image)[0]

    return StepGraphSet(plain=StepGraphs(without_res, max_graphs=max_graphs, capturer=capturer, name="dit"),
                        with_residual=StepGraphs(with_res, max_graphs=max_graphs, capturer=capturer,
                                                 name="dit+residual"))
