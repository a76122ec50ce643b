"""Loading a Wan2.1 DiT from a GGUF file (the quantized single files ComfyUI users run: Q8_0, Q6_K, Q5_K_M, Q5_0,
Q4_K_M, Q4_0, with F16/BF16/F32 tensors beside them), read with the ``gguf`` package (``pip install 'wanrt[gguf]'``).

Keys are mapped like any single-file checkpoint (official, ComfyUI-prefixed or diffusers names). Quantized 2-D
weights become :class:`~wanrt.quant.gguf.GGUFLinear` layers that keep their blocks on the device and dequantize
them just before each GEMM; every other tensor loads as in ``load_transformer`` (the ``keep_fp32`` rule). Tensors of
more than 4 dimensions (the patch embedding) are stored flattened with their shape in the file's
``comfy.gguf.orig_shape.<key>`` metadata, as ComfyUI-GGUF writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import CheckpointError


def _gguf():
    try:
        import gguf  # an optional extra: only imported for a .gguf file
    except ImportError as e:
        raise ImportError("GGUF checkpoints need the gguf package: pip install 'wanrt[gguf]'") from e
    return gguf


def read_gguf(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """``key -> (type name, logical shape, data)`` of every tensor (``data``: the raw uint8 blocks of a quantized
    tensor, else its values), memory-mapped. Raises CheckpointError (corrupt file, unsupported type)."""
    from ..quant.gguf import BLOCKS

    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds for a bad file
        raise CheckpointError(f"corrupt or truncated GGUF file: {e}", path) from e
    out = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
        field = reader.fields.get(f"comfy.gguf.orig_shape.{t.name}")
        if field is not None:
            shape = tuple(int(s) for s in field.contents())
        if qtype not in BLOCKS and qtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"unsupported GGUF tensor type {qtype} (supported: F32, F16, BF16, "
                                  f"{', '.join(BLOCKS)})", path, t.name)
        out[t.name] = (qtype, shape, t.data)
    return out


def _values(qtype: str, shape: tuple[int, ...], data: np.ndarray) -> torch.Tensor:
    """An unquantized GGUF tensor as a CPU tensor of ``shape`` (float32 for F32, float16, bfloat16)."""
    t = torch.from_numpy(np.array(data, copy=True))  # the file's mapping is read-only
    if qtype == "BF16":  # stored as raw 16-bit words
        t = t.view(torch.bfloat16)
    return t.reshape(shape)


def load_gguf_transformer(path: Path, device: torch.device, dtype: torch.dtype | None, config, key_mapper,
                          config_from_shapes):
    """The DiT of GGUF file ``path`` on ``device`` (eager kernels; the caller sets the backend): quantized weights as
    :class:`GGUFLinear` computing in ``dtype`` (default bf16), the rest as ``load_transformer`` loads them.
    ``key_mapper(keys)`` picks the key map and ``config_from_shapes(shapes, file=)`` infers the architecture when
    ``config`` is None (both from ``wanrt.checkpoints.loaders``, which calls this).

    Raises:
        CheckpointError: missing or unexpected keys, shape mismatches, unsupported types (names the file and key).
        ImportError: the gguf package is not installed (with the install command).
    """
    from ..models.dit import Linear, WanDiT
    from ..quant.gguf import BLOCKS, GGUFLinear

    tensors = read_gguf(path)
    _, mapper = key_mapper(list(tensors))
    mapped = {}
    for key in tensors:
        try:
            official = mapper(key)
        except (KeyError, ValueError):
            raise CheckpointError("DiT: unexpected key in checkpoint", path, key) from None
        if official is not None:
            mapped[official] = key
    cfg = config or config_from_shapes({k: tensors[v][1] for k, v in mapped.items()}, file=path)
    compute = dtype or torch.bfloat16
    with torch.device("meta"):
        model = WanDiT(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing = [k for k in expected if k not in mapped]
    if missing:
        raise CheckpointError("DiT: checkpoint lacks a parameter", path, missing[0])
    extra = [v for k, v in mapped.items() if k not in expected]
    if extra:
        raise CheckpointError("DiT: unexpected key in checkpoint", path, extra[0])
    state = {}
    for key, shape in expected.items():
        qtype, stored, data = tensors[mapped[key]]
        if stored != shape:
            raise CheckpointError(f"DiT: shape mismatch for {key!r}: checkpoint {list(stored)}, model {list(shape)}",
                                  path, mapped[key])
        if qtype in BLOCKS:
            name = key[: -len(".weight")]
            lin = model.get_submodule(name)
            if not key.endswith(".weight") or not isinstance(lin, Linear):
                raise CheckpointError(f"DiT: {qtype} is only supported for Linear weights", path, mapped[key])
            parent, _, child = name.rpartition(".")
            layer = GGUFLinear(lin.in_features, lin.out_features, qtype, bias=lin.bias is not None,
                               out_dtype=compute, device=device)
            layer.raw.copy_(torch.from_numpy(np.array(data, copy=True)).reshape(layer.raw.shape))
            setattr(model.get_submodule(parent), child, layer)
            continue
        value = _values(qtype, shape, data)
        target = torch.float32 if WanDiT.keep_fp32(key) else (dtype or value.dtype)
        state[key] = value.to(device, target)
    for key, value in state.items():
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        setattr(module, leaf, torch.nn.Parameter(value, requires_grad=False))
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise CheckpointError("DiT: a buffer was not loaded", path, name)
    return model.eval()
