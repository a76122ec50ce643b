"""LoRAs on a loaded DiT: fused into the weights, or as a runtime low-rank branch beside the Linears.

**Fused** (``mode="fuse"``): ``W = W_base + Σ strength · scale · (B @ A) + Σ strength · diff`` in float32, written in
the weight's dtype, in place (the tensors keep their storage, so captured CUDA graphs stay valid). On the 8-bit
layers of :mod:`wanrt.quant` the base is dequantized, the sum requantized per output channel with fresh scales.

*Restoring*: the first fused LoRA that touches a tensor keeps a host copy of its base value (only the touched
tensors: for an 8-bit layer, a byte per weight and its scales). Each change of the fused set recomputes the touched
tensors from that copy, so changing strengths does not accumulate rounding, and when no fused LoRA touches a tensor
any more its base copy is written back: unloading restores the base weights bit for bit. (Re-reading the checkpoint
instead would save the host copy, but does not exist for a model built in memory or from a GGUF or a quantized-at-load
file; the host copy is documented in ``engine.loras``.)

**Runtime** (``mode="runtime"``): every Linear a runtime LoRA touches gets a forward hook adding
``(x @ A_catᵀ · s) @ B_catᵀ`` in its compute dtype, where ``A_cat [ΣR, in]`` and ``B_cat [out, ΣR]`` concatenate
the ranks of all runtime LoRAs on that layer and ``s [ΣR]`` holds each rank row's ``strength · scale``: one GEMM
pair for any number of LoRAs, and strengths change by rewriting ``s`` in place (per request, graph-safe). Full
differences on a Linear add ``strength · (x @ diffᵀ)`` and ``strength · diff_b`` in the hook. Targets that are not
Linears (the ``modulation`` tables, norms) are written as in fused mode whatever the mode; they are small.

An 8-bit Linear with a runtime branch reads its float input (the fused norm stops quantizing for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .formats import Delta, LoraAdapter, LoraError

log = logging.getLogger("wanrt")
MODES = ("fuse", "runtime")


@dataclass
class LoadedLora:
    """A LoRA applied to a model: the adapter, its strength and mode."""

    adapter: LoraAdapter
    strength: float
    mode: str


def _is_linear(m: nn.Module | None) -> bool:
    return m is not None and getattr(m, "in_features", None) is not None and getattr(m, "out_features", None) is not None


def _is_8bit(m: nn.Module) -> bool:
    return hasattr(m, "qdtype") and hasattr(m, "weight_scale")


def _is_gguf(m: nn.Module) -> bool:
    return hasattr(m, "raw") and hasattr(m, "qtype")


class RuntimeBranch(nn.Module):
    """The low-rank side branch of one Linear (see the module docstring). Its tensors are non-persistent buffers,
    so they move with the layer (``model`` offload) and never enter a state dict."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor, dense: list[torch.Tensor],
                 dense_s: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("A", A, persistent=False)  # [R, in]
        self.register_buffer("B", B, persistent=False)  # [out, R]
        self.register_buffer("s", s, persistent=False)  # [R]
        self.dense = len(dense)
        for k, d in enumerate(dense):
            self.register_buffer(f"diff{k}", d, persistent=False)  # [out, in]
        self.register_buffer("dense_s", dense_s, persistent=False)  # [n_dense]
        self.register_buffer("bias", bias, persistent=False)  # [out] (Σ strength · diff_b), or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's output ``[..., out]`` in the branch dtype for input ``x [..., in]``."""
        x = x.to(self.B.dtype)
        y = None
        if self.A.shape[0]:
            y = F.linear(F.linear(x, self.A) * self.s, self.B)  # [..., out]
        for k in range(self.dense):
            d = F.linear(x, getattr(self, f"diff{k}")) * self.dense_s[k]
            y = d if y is None else y + d
        if self.bias is not None:
            y = self.bias if y is None else y + self.bias
        return y


def _hook(module: nn.Module, args, out):
    branch = module.lora_branch
    x = args[0]
    if not isinstance(x, torch.Tensor):  # a pre-quantized activation: the norm must not quantize for this layer
        raise RuntimeError("a Linear with a runtime LoRA got a quantized input; its float input is needed")
    return out + branch(x).to(out.dtype)


class LoraManager:
    """The LoRAs of one DiT: what is loaded, the base copies of fused tensors and the runtime branches.

    Args:
        model: the :class:`~wanrt.models.dit.WanDiT`.
        device: where runtime branches compute (default: the device of the model's head).
    """

    def __init__(self, model: nn.Module, device: torch.device | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else model.head.head.weight.device
        self.loaded: dict[str, LoadedLora] = {}
        self._base: dict[str, dict[str, torch.Tensor]] = {}  # target -> {"weight"/"weight_scale"/"bias"/"param"}
        self._modules = dict(model.named_modules())
        self._params = dict(model.named_parameters())
        self.generation = 0  # bumped when the runtime branches change structure (CUDA graphs must be recaptured)

    # ------------------------------------------------------------------ public
    def add(self, adapter: LoraAdapter, strength: float = 1.0, mode: str = "fuse") -> str:
        """Apply ``adapter`` with ``strength`` in ``mode``; returns its name.

        Raises:
            LoraError: a name already loaded; fusing into GGUF, sharded or block-offloaded weights (the message
                says to use ``mode="runtime"``); ValueError: unknown mode or non-finite strength.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        strength = _strength(strength)
        if adapter.name in self.loaded:
            raise LoraError(f"a LoRA named {adapter.name!r} is already loaded: unload it first, or pass name=")
        if mode == "fuse":
            self._check_fusable(adapter)
        self.loaded[adapter.name] = LoadedLora(adapter, strength, mode)
        try:
            self._refresh(adapter.deltas, structure=mode == "runtime")
        except Exception:
            del self.loaded[adapter.name]
            self._refresh(adapter.deltas, structure=mode == "runtime")
            raise
        log.info("LoRA %s loaded (%s, strength %g)", adapter.describe(), mode, strength)
        return adapter.name

    def set_strengths(self, strengths: dict[str, float]) -> None:
        """Change the strengths of loaded LoRAs (fused ones are recomputed from the base copies).

        Raises:
            KeyError: a name that is not loaded (lists the loaded ones).
        """
        new = {self._name(n): _strength(s) for n, s in strengths.items()}
        touched = {}
        for n, s in new.items():
            if self.loaded[n].strength != s:
                self.loaded[n].strength = s
                touched.update(self.loaded[n].adapter.deltas)
        self._refresh(touched, structure=False)

    def remove(self, name: str | None = None) -> None:
        """Unload LoRA ``name`` (all of them with None); fused tensors no LoRA touches any more get their base back,
        bit for bit."""
        names = list(self.loaded) if name is None else [self._name(name)]
        touched = {}
        runtime = False
        for n in names:
            item = self.loaded.pop(n)
            touched.update(item.adapter.deltas)
            runtime |= item.mode == "runtime"
        self._refresh(touched, structure=runtime)

    def info(self) -> dict[str, dict]:
        """``{name: {"strength", "mode", "format", "source", "targets", "rank"}}`` of the loaded LoRAs (the host
        memory of the base copies is :attr:`base_bytes`)."""
        out = {n: {"strength": x.strength, "mode": x.mode, "format": x.adapter.format, "source": x.adapter.source,
                   "targets": len(x.adapter.deltas),
                   "rank": max((d.rank for d in x.adapter.deltas.values()), default=0)}
               for n, x in self.loaded.items()}
        return out

    @property
    def base_bytes(self) -> int:
        """Host bytes of the base copies of fused tensors."""
        return sum(t.numel() * t.element_size() for d in self._base.values() for t in d.values())

    def runtime_names(self) -> list[str]:
        return [n for n, x in self.loaded.items() if x.mode == "runtime"]

    # ------------------------------------------------------------------ internals
    def _name(self, name: str) -> str:
        if name not in self.loaded:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self.loaded) or 'none'})")
        return name

    def _check_fusable(self, adapter: LoraAdapter) -> None:
        if getattr(self.model, "offload", None) is not None:
            raise LoraError(f"{adapter.source}: the DiT's blocks are offloaded (streamed from host memory); fusing "
                            "would rewrite weights the mover holds: load it with mode='runtime'")
        for target in adapter.deltas:
            m = self._modules.get(target)
            if m is not None and _is_gguf(m):
                raise LoraError(f"{adapter.source}: {target!r} is a GGUF layer (quantized blocks are kept as they "
                                "are): load this LoRA with mode='runtime'")
            t = getattr(m, "weight", None) if m is not None else self._params.get(target)
            if _is_dtensor(t):
                raise LoraError(f"{adapter.source}: the DiT is sharded (shard_weights): load it with mode='runtime'")

    def _writers(self, target: str) -> list[tuple[Delta, float]]:
        """The deltas written into ``target``'s tensors: fused LoRAs, and runtime ones on a non-Linear target."""
        hookable = _is_linear(self._modules.get(target))
        return [(x.adapter.deltas[target], x.strength) for x in self.loaded.values()
                if target in x.adapter.deltas and x.strength != 0 and (x.mode == "fuse" or not hookable)]

    def _refresh(self, deltas: dict[str, Delta], structure: bool) -> None:
        with torch.no_grad():
            for target in deltas:
                self._write(target)
                if _is_linear(self._modules.get(target)):
                    self._branch(target, structure)
        if structure:
            self.generation += 1

    def _write(self, target: str) -> None:
        writers = self._writers(target)
        base = self._base.get(target)
        m = self._modules.get(target)
        if not writers:
            if base is not None:  # back to the base, bit for bit
                for key, value in base.items():
                    self._tensor(target, key).copy_(value)
                del self._base[target]
            return
        if base is None:
            keys = ["param"] if m is None else ["weight"] + (["weight_scale"] if _is_8bit(m) else []) + \
                (["bias"] if getattr(m, "bias", None) is not None else [])
            base = self._base[target] = {k: self._tensor(target, k).detach().to("cpu", copy=True) for k in keys}
        dev = self._tensor(target, "param" if m is None else "weight").device
        if m is None:  # a parameter (modulation)
            value = base["param"].to(dev, torch.float32)
            for d, s in writers:
                if d.diff is not None:
                    value = value + s * d.diff.to(dev).reshape(value.shape)
            self._tensor(target, "param").copy_(value)
            return
        if _is_8bit(m):
            from ..quant.layers import dequantize_rowwise, quantize_rowwise

            w = dequantize_rowwise(base["weight"].to(dev), base["weight_scale"].to(dev), torch.float32)
        else:
            w = base["weight"].to(dev, torch.float32)
        for d, s in writers:
            if d.A is not None:
                w = w + (s * d.scale) * (d.B.to(dev) @ d.A.to(dev)).reshape(w.shape)
            if d.diff is not None:
                w = w + s * d.diff.to(dev).reshape(w.shape)
        if _is_8bit(m):
            q, scale = quantize_rowwise(w, m.qdtype)
            m.weight.copy_(q)
            m.weight_scale.copy_(scale)
        else:
            m.weight.copy_(w)
        if "bias" in base:
            b = base["bias"].to(dev, torch.float32)
            for d, s in writers:
                if d.diff_b is not None:
                    b = b + s * d.diff_b.to(dev)
            m.bias.copy_(b)

    def _tensor(self, target: str, key: str) -> torch.Tensor:
        if key == "param":
            return self._params[target].data
        return getattr(self._modules[target], key).data

    def _branch(self, target: str, structure: bool) -> None:
        """(Re)build or update the runtime branch of Linear ``target``."""
        m = self._modules[target]
        items = [x for x in self.loaded.values() if x.mode == "runtime" and target in x.adapter.deltas]
        old = getattr(m, "lora_branch", None)
        if not items:
            if old is not None:
                m._lora_hook.remove()
                del m.lora_branch, m._lora_hook
            return
        from ..models.dit import compute_dtype

        dtype, dev = compute_dtype(m), self.device
        s, dense_s, bias = [], [], None
        for x in items:
            d = x.adapter.deltas[target]
            if d.A is not None:
                s.append(torch.full((d.rank,), x.strength * d.scale))
            if d.diff is not None:
                dense_s.append(x.strength)
            if d.diff_b is not None:
                b = x.strength * d.diff_b
                bias = b if bias is None else bias + b
        s = torch.cat(s) if s else torch.zeros(0)
        dense_s = torch.tensor(dense_s, dtype=torch.float32)
        if old is not None and not structure and old.s.shape == s.shape and old.dense == len(dense_s) and \
                (old.bias is None) == (bias is None):
            old.s.copy_(s)  # strengths only: in place (a captured graph reads the same buffers)
            old.dense_s.copy_(dense_s)
            if bias is not None:
                old.bias.copy_(bias)
            return
        deltas = [x.adapter.deltas[target] for x in items]
        A = torch.cat([d.A for d in deltas if d.A is not None]) if s.numel() else torch.zeros(0, m.in_features)
        B = torch.cat([d.B for d in deltas if d.B is not None], dim=1) if s.numel() else torch.zeros(m.out_features, 0)
        branch = RuntimeBranch(A.to(dev, dtype), B.to(dev, dtype), s.to(dev, dtype),
                               [d.diff.to(dev, dtype) for d in deltas if d.diff is not None], dense_s.to(dev, dtype),
                               None if bias is None else bias.to(dev, dtype))
        if old is not None:
            m._lora_hook.remove()
        m.lora_branch = branch
        m._lora_hook = m.register_forward_hook(_hook)


def _is_dtensor(t) -> bool:
    if t is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def _strength(s) -> float:
    import math

    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ValueError(f"a LoRA strength must be a finite number, got {s!r}")
    return float(s)


def manager_of(model: nn.Module, device=None) -> LoraManager:
    """The :class:`LoraManager` of ``model`` (created on first use, kept as ``model.lora``)."""
    mgr = getattr(model, "lora", None)
    if mgr is None:
        mgr = LoraManager(model, device)
        model.lora = mgr
    return mgr


def apply_lora(model: nn.Module, source, strength: float = 1.0, *, mode: str = "fuse", name: str | None = None):
    """Apply a LoRA file or state dict to ``model`` (a :class:`~wanrt.models.dit.WanDiT`); returns its name.

    ``model.lora`` (:class:`LoraManager`) then changes strengths (``set_strengths``) and unloads (``remove``).
    See :func:`wanrt.lora.formats.read_lora` for the formats and errors and the module docstring for the modes.
    """
    from .formats import read_lora

    adapter = read_lora(source, model, name)
    return manager_of(model).add(adapter, strength, mode)
