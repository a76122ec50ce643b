"""Weight quantization of the DiT: FP8 and INT8 Linear layers swapped in by qualified name.

``quantize_(model, QuantConfig("fp8"))`` replaces the selected ``nn.Linear`` modules (by default the DiT blocks'
attention and FFN projections: self- and cross-attention q/k/v/o, the image k/v, ffn.0 and ffn.2) with
:class:`~wanrt.quant.layers.FP8Linear`, :class:`~wanrt.quant.layers.Int8Linear` or
:class:`~wanrt.quant.layers.Int8WeightOnlyLinear`, one layer at a time. Modulation tables, time/text embeddings,
the patch embedding, img_emb, the head and the norms stay in high precision, the same set every fp8 Wan
checkpoint keeps high (docs/model-reference.md §10.3).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .layers import (
    FP8_DTYPE,
    SCHEMES,
    FP8Linear,
    Int8Linear,
    Int8WeightOnlyLinear,
    dequantize_rowwise,
    quantize_per_token,
    quantize_rowwise,
)

#: DiT Linears quantized by default (official names): attention projections and the FFN of every block, VACE's
#: blocks included (their ``before_proj`` / ``after_proj`` stay in the compute dtype, as the embeddings do).
DIT_QUANT_PATTERN = re.compile(
    r"^(vace_)?blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o|k_img|v_img)|ffn\.(0|2))$")


#: UMT5 encoder Linears quantized by ``text_encoder_precision``: attention projections and the gated FFN.
T5_QUANT_PATTERN = re.compile(r"^blocks\.\d+\.(attn\.(q|k|v|o)|ffn\.(gate\.0|fc1|fc2))$")


def t5_filter(name: str, module: nn.Module) -> bool:
    """The UMT5 selection: :data:`T5_QUANT_PATTERN` on an ``nn.Linear``."""
    return isinstance(module, nn.Linear) and T5_QUANT_PATTERN.match(name) is not None


def dit_filter(name: str, module: nn.Module) -> bool:
    """The default selection: :data:`DIT_QUANT_PATTERN` on an ``nn.Linear``."""
    return isinstance(module, nn.Linear) and DIT_QUANT_PATTERN.match(name) is not None


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    Attributes:
        scheme: ``"fp8"`` (W8A8 float8_e4m3fn), ``"int8"`` (W8A8) or ``"int8-wo"`` (int8 weights, bf16 compute).
        out_dtype: dtype of the layers' outputs and biases (the model's compute dtype, bf16).
        act_backend: per-token activation quantization: ``"eager"`` or ``"triton"`` (fused kernel).
    """

    scheme: str = "fp8"
    out_dtype: torch.dtype = torch.bfloat16
    act_backend: str = "eager"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme must be one of {list(SCHEMES)}, got {self.scheme!r}")
        if not self.out_dtype.is_floating_point:
            raise ValueError(f"out_dtype must be a float dtype, got {self.out_dtype}")
        if self.act_backend not in ("eager", "triton"):
            raise ValueError(f"act_backend must be 'eager' or 'triton', got {self.act_backend!r}")


def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Callable[[str, nn.Module], bool] = dit_filter, *, device=None) -> nn.Module:
    """Replace the selected Linears of ``model`` in place, one at a time; returns ``model``.

    Each layer is quantized on ``device`` (default: where its weight is) and its float weight released before the
    next, so a model loaded on the CPU can be quantized onto the GPU without ever holding its float copy there.
    Modules not selected are left where they are (move the model afterwards).

    Raises:
        ValueError: bad config, or nothing matched the filter.
    """
    cls = SCHEMES[config.scheme]
    targets = [(name, m) for name, m in model.named_modules() if filter_fn(name, m)]
    if not targets:
        raise ValueError("quantize_: no module matched the filter")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls.from_linear(linear, out_dtype=config.out_dtype, device=device,
                                                act_backend=config.act_backend))
        del linear
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → quantized layer, for every quantized Linear in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, tuple(SCHEMES.values()))}


def quant_scheme(model: nn.Module) -> str | None:
    """The scheme of the model's quantized layers (None when there are none).

    Raises:
        ValueError: the model mixes schemes.
    """
    schemes = {m.scheme for m in quantized_layers(model).values()}
    if len(schemes) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(schemes)}")
    return schemes.pop() if schemes else None


def save_quantized(model: nn.Module, path) -> None:
    """Write a quantized DiT as one safetensors file that ``load_transformer``/``Engine`` load directly.

    Keys are the official ones plus ``<layer>.weight_scale`` (float32, per output channel) next to each 8-bit
    ``<layer>.weight``; the metadata holds the format tag ``wanrt_quant`` (the scheme) and the official
    ``config`` JSON. The write is atomic (a temporary file renamed into place).

    Raises:
        ValueError: the model has no quantized layer, or mixes schemes.
    """
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    scheme = quant_scheme(model)
    if scheme is None:
        raise ValueError("save_quantized: the model has no quantized layer (run quantize_ first)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"wanrt_quant": scheme, "format": "wanrt-quant-v1"}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_official_config"):
        meta["config"] = json.dumps(config.to_official_config())
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model``."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


__all__ = [
    "DIT_QUANT_PATTERN",
    "FP8_DTYPE",
    "FP8Linear",
    "Int8Linear",
    "Int8WeightOnlyLinear",
    "QuantConfig",
    "SCHEMES",
    "dequantize_rowwise",
    "dit_filter",
    "quant_scheme",
    "quantize_",
    "quantize_per_token",
    "quantize_rowwise",
    "quantized_layers",
    "save_quantized",
    "t5_filter",
    "weight_bytes",
]
