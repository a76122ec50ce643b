"""Public loaders: ``load_transformer``, ``load_vae``, ``load_text_encoder``.

Each accepts the official layout, the diffusers layout, or a single weights file, detects which from
files and keys, builds the module on the meta device and materializes the weights one tensor at a
time in the target dtype on the target device (see :mod:`wanrt.checkpoints.io`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .io import (
    CheckpointError,
    check_folder_links,
    check_symlink_loop,
    load_into_module,
    open_tensor_source,
)
from .layout import (
    OFFICIAL_T5,
    OFFICIAL_TOKENIZER,
    OFFICIAL_VAE,
    OFFICIAL_VAE22,
    LayoutError,
    config_kind,
    detect_layout,
    dit_weights_file,
    read_json,
)

log = logging.getLogger("wanrt")

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_VACE_BLOCK = re.compile(r"^vace_blocks\.(\d+)\.")


def _device(device) -> torch.device:
    """Resolve ``device`` (None: CUDA when available, else CPU); ValueError for an unusable one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available in this torch build")
    return dev


def _check_path_and_dtype(path, dtype) -> tuple[Path, torch.dtype | None]:
    """The checks every loader starts with: the path is no symlink loop (SymlinkLoopError) and exists
    (FileNotFoundError), the dtype is a floating dtype or None (ValueError)."""
    path = Path(path).expanduser()
    check_symlink_loop(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    return path, dtype


# ---------------------------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------------------------
def _dit_key_mapper(keys: list[str]):
    """Pick the key map from the keys themselves: official (possibly Comfy-prefixed) or diffusers."""
    from .keymap_dit import dit_to_official

    prefix = ""
    for p in COMFY_PREFIXES:
        if keys and all(k.startswith(p) for k in keys if not k.startswith("scaled_fp8")):
            prefix = p
            break
    stripped = [k[len(prefix):] for k in keys]
    diffusers = any(k.startswith(("condition_embedder.", "scale_shift_table", "proj_out.")) or ".attn1." in k for k in stripped)
    if diffusers:
        # diffusers' own loader ignores "norm_added_q" (never used by Wan); so do we.
        return "diffusers", lambda k: None if k.endswith("norm_added_q.weight") else dit_to_official(k[len(prefix):])
    return "official", lambda k: k[len(prefix):]


def dit_config_from_shapes(shapes: dict[str, tuple[int, ...]], text_len: int = 512, *, file=None):
    """Infer the DiT config from official-key tensor shapes (for single files without a config).

    The official Wan2.1 models all use head_dim 128, so ``num_heads = dim // 128``.

    Raises:
        CheckpointError: a key the inference needs is absent (names ``file``, the weights, and the key).
    """
    from ..models.dit import DiTConfig
    from ..models.dit_config import TI2V_LATENT_DIM, default_vace_layers

    try:
        dim, in_dim = shapes["patch_embedding.weight"][:2]
        layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK.match(k)))
        vace = "vace_patch_embedding.weight" in shapes
        out_dim = shapes["head.head.weight"][0] // 4
        clip = "img_emb.proj.0.weight" in shapes
        if vace:
            model_type = "vace"
        elif "img_emb.emb_pos" in shapes:
            model_type = "flf2v"
        elif clip or in_dim > out_dim:  # Wan2.2 I2V-A14B: the conditioning latent y, no img_emb (no CLIP)
            model_type = "i2v"
        else:  # Wan2.2 TI2V-5B: a t2v architecture on 48-channel latents
            model_type = "ti2v" if in_dim == out_dim == TI2V_LATENT_DIM else "t2v"
        cfg = dict(
            model_type=model_type,
            dim=dim, in_dim=in_dim, num_layers=layers,
            ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
            freq_dim=shapes["time_embedding.0.weight"][1],
            text_dim=shapes["text_embedding.0.weight"][1],
            out_dim=out_dim,
            num_heads=max(1, dim // 128), text_len=text_len,
        )
        if clip:
            cfg.update(image_dim=shapes["img_emb.proj.0.weight"][0])
        elif model_type == "i2v":
            cfg.update(image_dim=None)
        if vace:  # which blocks get the hints is not in the tensors: the count placed evenly (the released ones)
            count = 1 + max(int(m.group(1)) for k in shapes if (m := _VACE_BLOCK.match(k)))
            cfg.update(vace_in_dim=shapes["vace_patch_embedding.weight"][1],
                       vace_layers=default_vace_layers(layers, count))
    except (KeyError, ValueError) as e:
        key = e.args[0] if isinstance(e, KeyError) and e.args else None
        raise CheckpointError(f"cannot infer the DiT architecture from the keys (missing {e})", file, key) from e
    return DiTConfig(**cfg)


def reconcile_clip(cfg, keys):
    """``cfg`` with ``image_dim=None`` when it is an i2v config with CLIP but the checkpoint (its tensor names
    ``keys``: official ``img_emb.*`` or diffusers ``condition_embedder.image_embedder.*``, any prefix) has no CLIP
    projection: Wan2.2 I2V-A14B's config.json has Wan2.1 i2v's form, only its weights say that it has no CLIP. Any
    other config is returned unchanged."""
    import dataclasses

    if cfg is None or cfg.model_type != "i2v" or cfg.image_dim is None:
        return cfg
    if any("img_emb." in k or "image_embedder." in k for k in keys):
        return cfg
    return dataclasses.replace(cfg, image_dim=None)


def _single_gguf(folder: Path) -> Path | None:
    """The one ``*.gguf`` file of a checkpoint folder (ComfyUI users keep the DiT so), or None."""
    if not folder.is_dir():
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:
        raise LayoutError(f"{folder}: several .gguf files ({', '.join(p.name for p in found)}); pass one of them")
    return found[0] if found else None


def _resolve_dit(path: Path):
    """Return (weights entry file, config or None, config source) for any accepted DiT path."""
    from ..models.dit import DiTConfig

    if path.is_file():
        if path.suffix != ".safetensors" and not path.name.endswith(".index.json"):
            raise LayoutError(f"{path}: a DiT file must be .safetensors (or a .safetensors.index.json)")
        sibling = path.parent / "config.json"
        check_symlink_loop(sibling)  # a looping config.json would read as absent (shapes would pick the config)
        cfg = None
        if sibling.is_file():
            raw = read_json(sibling)
            kind = config_kind(raw)
            if kind == "official":
                cfg = DiTConfig.from_official_config(raw)
            elif kind == "diffusers":
                cfg = DiTConfig.from_diffusers_config(raw)
        return path, cfg
    layout = detect_layout(path)
    folder = layout.transformer
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise LayoutError(f"{folder}: missing config.json for the DiT")
    raw = read_json(cfg_path)
    kind = config_kind(raw)
    if kind is None:
        raise LayoutError(f"{cfg_path}: not a WanModel or WanTransformer3DModel config")
    cfg = DiTConfig.from_official_config(raw) if kind == "official" else DiTConfig.from_diffusers_config(raw)
    return dit_weights_file(folder), cfg


def _config_from_source(src, mapper):
    shapes = {}
    for k, s in src.shapes().items():
        mk = mapper(k)
        if mk is not None:
            shapes[mk] = s
    return dit_config_from_shapes(shapes, file=src.describe())


def dit_config_of_file(path):
    """The ``DiTConfig`` a single ``.safetensors`` file's tensor shapes say (:func:`dit_config_from_shapes`: its
    ``num_heads`` assumes head_dim 128), read from the header alone.

    Raises:
        CheckpointError: a key the inference needs is absent, or the file is not a readable safetensors file.
    """
    with open_tensor_source(Path(path)) as src:
        _, mapper = _dit_key_mapper(src.keys())
        return _config_from_source(src, mapper)


def load_transformer(path, device=None, dtype=torch.bfloat16, *, config=None, backend="auto", quantization=None,
                     vae_backend="eager", defer_blocks=False):
    """Load the Wan2.1 DiT from any supported layout.

    Args:
        path: an official checkpoint folder, a diffusers pipeline folder or its ``transformer/`` folder,
            or one ``.safetensors`` file (official keys, optionally ComfyUI-prefixed
            ``model.diffusion_model.``, or diffusers keys; architecture from a sibling ``config.json``,
            the file's ``config`` metadata, or inferred from shapes).
        device: target device (default: CUDA when available, else CPU).
        dtype: dtype of the large Linear/Conv weights (default bf16, whose GEMMs equal the official
            bf16 autocast); modulation tables, time MLP, head and norms stay float32 (``WanDiT.keep_fp32``).
            float32 gives a pure fp32 model.
        config: a ``DiTConfig`` that overrides the checkpoint's.
        backend: the kernels that run it (``WanDiT.set_backend``): ``"auto"`` (the fastest eligible on this
            device, logged), ``"eager"`` (the exact reference path), ``"sdpa"``, ``"triton"``, ``"flash-attn"``,
            ``"sageattention"`` or ``"xformers"``. The choice is in ``model.plan``, with the 8-bit Linears'
            activation-quantization kernels (``plan.quant``: Triton only where the fused ops are).
        quantization: ``None``, ``"fp8"``, ``"int8"`` or ``"int8-wo"`` (:mod:`wanrt.quant`): the blocks'
            attention and FFN Linears become 8-bit layers computing in ``dtype``. A float checkpoint is read
            into host memory and quantized layer by layer onto ``device`` (the float copy never sits on the
            GPU). A quantized checkpoint (written by :func:`wanrt.quant.save_quantized`, or a LightX2V-style
            file with per-channel ``weight_scale``) loads as it is stored; fp8 weights on a GPU without fp8
            GEMMs (compute capability < 8.9) are dequantized to ``dtype`` with a log line.
        vae_backend: the VAE's backend (``"eager"``, ``"triton"``, ``"tensorrt"``), resolved and checked into
            ``model.plan.vae`` with the rest so that one plan names every kernel (the Engine hands it to
            ``WanVAE.set_backend``); this model does not run it.
        defer_blocks: check the blocks' tensors in the file's header but do not read them: each is a one-element
            placeholder of its shape and dtype (no memory) until a reader fills it (disk placement,
            :mod:`wanrt.offload.disk`, which the Engine uses with ``offload_to_disk``). Float checkpoints only.

    Returns:
        ``WanDiT`` in eval mode, called as ``model(x, t, context)``: x ``[B, C_in, F, H, W]``, t ``[B]``
        on the 0..1000 scale, context ``[B, L, text_dim]``; returns the velocity ``[B, C_out, F, H, W]`` fp32.

    Raises:
        FileNotFoundError: the path does not exist.
        LayoutError: the folder is neither layout, holds both (point at one part or move one away), or lacks
            config/weights.
        CheckpointError: missing/unexpected keys, shape mismatch, an integer tensor where a float one belongs,
            corrupt or truncated file, a shard index naming a file outside its folder, or a symlink loop
            (``SymlinkLoopError``: "symlink loop at PATH") (names file, key).
        ValueError: unknown backend or VAE backend name (checked before any weight is read).
        BackendUnavailableError: an explicit backend (or VAE backend) that cannot run on this device (install hint
            in the text).
    """
    from ..models.dit import DiTConfig, WanDiT
    from ..ops.backends import BACKEND_NAMES, plan
    from ..ops.selfcheck import probe_capabilities

    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {backend!r}")

    path, dtype = _check_path_and_dtype(path, dtype)
    gguf_file = path if path.suffix == ".gguf" else _single_gguf(path)
    if gguf_file is not None:  # GGUF: quantized blocks kept on the device, dequantized per layer
        from .gguf_loader import load_gguf_transformer

        if quantization is not None:
            raise ValueError(f"{gguf_file.name} is already quantized (GGUF); leave quantization unset")
        if defer_blocks:
            raise ValueError(f"{gguf_file.name}: disk placement streams safetensors checkpoints; a GGUF DiT is held "
                             "quantized in memory (load it without offload_to_disk)")
        target = _device(device)
        sibling = gguf_file.parent / "config.json"  # the architecture, where the file's folder says it
        if config is None and sibling.is_file():
            raw = read_json(sibling)
            kind = config_kind(raw)
            if kind is not None:
                config = DiTConfig.from_official_config(raw) if kind == "official" else \
                    DiTConfig.from_diffusers_config(raw)
        model = load_gguf_transformer(gguf_file, target, dtype, config, _dit_key_mapper, dit_config_from_shapes)
        model.set_backend(plan(backend, probe_capabilities(target, dtype or torch.bfloat16, model.config.head_dim),
                               vae=vae_backend))
        return model
    weights, cfg = _resolve_dit(path)
    with open_tensor_source(weights) as src:
        _, mapper = _dit_key_mapper(src.keys())
        if config is not None:
            cfg = config
        elif cfg is None and "config" in src.metadata:
            try:
                raw = json.loads(src.metadata["config"])
            except ValueError as e:
                raise CheckpointError(f"the file's 'config' metadata is not JSON: {e}", src.describe()) from e
            cfg = DiTConfig.from_official_config(raw) if config_kind(raw) == "official" else DiTConfig.from_diffusers_config(raw)
        elif cfg is None:
            cfg = _config_from_source(src, mapper)
        if config is None:  # a config.json of Wan2.1 i2v's form over the weights of a CLIP-less (Wan2.2) i2v
            cfg = reconcile_clip(cfg, src.keys())
        # Resolve the kernels before reading any weight, so a backend that cannot run fails fast.
        target = _device(device)
        compute = dtype or torch.bfloat16
        ops_plan = plan(backend, probe_capabilities(target, compute, cfg.head_dim), vae=vae_backend)
        stored = _stored_quantization(src, mapper, quantization, target)
        if defer_blocks and (quantization is not None or stored.layers):
            raise ValueError("defer_blocks (disk placement) streams float weights; this load is 8-bit "
                             f"({quantization or stored.scheme}): load it without offload_to_disk")
        act_backend = ops_plan.quant  # per-token activation quantization: the plan's, as every kernel
        qmap = _quant_mapper(mapper)
        with torch.device("meta"):
            model = WanDiT(cfg)
        if stored.layers:
            from ..quant import SCHEMES

            cls = SCHEMES[stored.scheme]
            for name in stored.layers:  # 8-bit layers, filled from the file as stored
                lin = model.get_submodule(name)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, cls(lin.in_features, lin.out_features,
                                                               lin.bias is not None, out_dtype=compute, device="meta",
                                                               act_backend=act_backend))
            quantized = {f"{n}.weight" for n in stored.layers}
            load_into_module(
                model, src, to_official=qmap, device=target, dtype=dtype,
                keep_fp32=lambda k: WanDiT.keep_fp32(k) or k.endswith(".weight_scale"),
                keep_stored=quantized.__contains__, scalar_ok=lambda k: k.endswith(".weight_scale"),
                fill_missing={f"{n}.weight_scale": torch.ones(model.get_submodule(n).out_features)
                              for n in stored.unscaled},
                what="DiT",
            )
            if stored.scheme == "fp8" and not fp8_gemm_supported(target):
                log.info("this GPU has no fp8 GEMMs (compute capability < 8.9): fp8 weights dequantized to %s",
                         compute)
                _dequantize_layers(model, stored.layers, compute)
        elif quantization is not None:
            from ..quant import QuantConfig, quantize_

            qcfg = QuantConfig(quantization, out_dtype=compute, act_backend=act_backend)
            # Float weights into host memory, then one layer at a time quantized onto the target device.
            load_into_module(model, src, to_official=qmap, device="cpu", dtype=dtype,
                             keep_fp32=WanDiT.keep_fp32, what="DiT")
            quantize_(model, qcfg, device=target)
            model.to(target)
        else:
            load_into_module(
                model, src, to_official=qmap, device=target, dtype=dtype,
                keep_fp32=WanDiT.keep_fp32, what="DiT",
                defer=(lambda k: k.startswith("blocks.")) if defer_blocks else (lambda k: False),
            )
    model.set_backend(ops_plan)
    return model


def _dequantize_layers(model, names, dtype) -> None:
    """Replace quantized layers by float ``Linear`` layers holding ``weight · scale`` in ``dtype``."""
    from ..models.dit import Linear

    for name in names:
        q = model.get_submodule(name)
        lin = Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        lin.weight = torch.nn.Parameter(q.dequantized_weight(dtype), requires_grad=False)
        if q.bias is not None:
            lin.bias = torch.nn.Parameter(q.bias.to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)


_QUANT_AUX = (".scale_input", ".input_scale", ".comfy_quant")  # read for validation, never loaded
_FP8_NAMES = ("F8_E4M3", "float8_e4m3fn")


def _quant_mapper(mapper):
    """The key map of a possibly quantized DiT file: ``<layer>.weight_scale`` and legacy ComfyUI
    ``<layer>.scale_weight`` map to the module's ``<layer>.weight_scale``; the ``scaled_fp8`` marker, static
    input scales and ``comfy_quant`` format tensors are dropped."""
    def f(k: str):
        if k == "scaled_fp8" or k.endswith(_QUANT_AUX):
            return None
        for suffix in (".scale_weight", ".weight_scale"):
            if k.endswith(suffix):
                official = mapper(k[: -len(suffix)] + ".weight")
                return None if official is None else official[: -len(".weight")] + ".weight_scale"
        return mapper(k)

    return f


@dataclass
class _StoredQuant:
    """What :func:`_stored_quantization` found: the scheme, the 8-bit layers with a scale, and fp8 layers
    stored without one (ComfyUI ``fp8_e4m3fn`` files: scale 1)."""

    scheme: str | None = None
    scaled: list[str] = field(default_factory=list)
    unscaled: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return self.scaled + self.unscaled


def _check_comfy_formats(src) -> None:
    """Validate the ComfyUI format declarations: the ``scaled_fp8`` marker's dtype, ``<layer>.comfy_quant``
    JSON tensors and the ``_quantization_metadata`` header entry. Only float8_e4m3fn is supported."""
    if "scaled_fp8" in src and src.dtype_name("scaled_fp8") not in _FP8_NAMES:
        raise CheckpointError(f"scaled fp8 checkpoint in {src.dtype_name('scaled_fp8')}: only float8_e4m3fn is "
                              "supported", src.file_of("scaled_fp8"), "scaled_fp8")
    formats: list[tuple[str, str]] = []
    for k in src.keys():
        if k.endswith(".comfy_quant"):
            try:
                spec = json.loads(bytes(src.get(k).to(torch.uint8).tolist()).decode())
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"comfy_quant is not a JSON format description: {e}", src.file_of(k), k) from e
            formats.append((k, str(spec.get("format", "")) if isinstance(spec, dict) else ""))
    raw = src.metadata.get("_quantization_metadata")
    if raw is not None:
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise CheckpointError(f"_quantization_metadata is not JSON: {e}", src.describe()) from e
        stack = [meta]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if "format" in node:
                    formats.append(("_quantization_metadata", str(node["format"])))
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    for where, fmt in formats:
        if fmt not in ("float8_e4m3fn", "fp8_e4m3fn", "float8_e4m3fn_rowwise", "float8_e4m3fn_tensorwise"):
            raise CheckpointError(f"unsupported quantization format {fmt!r} (only float8_e4m3fn is supported)",
                                  src.describe(), where)


def _stored_quantization(src, mapper, requested, device) -> _StoredQuant:
    """The 8-bit layers stored in a DiT checkpoint and the scheme that runs them.

    Recognized: ``<layer>.weight_scale`` next to an fp8/int8 ``<layer>.weight`` (wanrt's own files, tagged
    ``wanrt_quant``; LightX2V per-channel files; newer ComfyUI scaled fp8, per tensor or per channel, with
    ``comfy_quant`` / ``_quantization_metadata`` declarations), legacy ComfyUI scaled fp8 (``scaled_fp8`` marker and
    a scalar ``<layer>.scale_weight``), and plain ComfyUI ``fp8_e4m3fn`` files (fp8 weights, no scale). Static
    input scales are ignored: activations are always scaled per token.

    Raises:
        ValueError: an unknown quantization request, or one the stored format cannot serve.
        CheckpointError: a scale without its weight, a scale of the wrong shape, an unknown format tag or an
            unsupported declared format.
    """
    from ..quant import DIT_QUANT_PATTERN, SCHEMES

    if requested is not None and requested not in SCHEMES:
        raise ValueError(f"quantization must be None or one of {list(SCHEMES)}, got {requested!r}")
    tag = src.metadata.get("wanrt_quant")
    if tag is not None and tag not in SCHEMES:
        raise CheckpointError(f"unknown quantization format tag wanrt_quant={tag!r} (known: {list(SCHEMES)})",
                              src.describe())
    _check_comfy_formats(src)
    qmap = _quant_mapper(mapper)
    keys = {}
    for k in src.keys():
        try:
            mk = qmap(k)
        except (KeyError, ValueError):  # an unknown key: load_into_module reports it with its file
            continue
        if mk is not None:
            keys[mk] = k
    found = _StoredQuant()
    found.scaled = sorted(k[: -len(".weight_scale")] for k in keys if k.endswith(".weight_scale"))
    shapes = src.shapes()
    for name in found.scaled:
        wkey, skey = keys.get(f"{name}.weight"), keys[f"{name}.weight_scale"]
        if wkey is None:
            raise CheckpointError(f"DiT: {name}.weight_scale has no {name}.weight", src.file_of(skey), skey)
        out = shapes[wkey][0]
        if shapes[skey] not in ((out,), (), (1,), (out, 1)):
            raise CheckpointError(f"DiT: {name}.weight_scale has shape {list(shapes[skey])}; expected [{out}] "
                                  "(per output channel) or a scalar", src.file_of(skey), skey)
        if src.dtype_name(wkey) not in (*_FP8_NAMES, "I8"):
            raise CheckpointError(f"DiT: {name}.weight has a scale but is stored as {src.dtype_name(wkey)} "
                                  "(expected float8_e4m3fn or int8)", src.file_of(wkey), wkey)
    scaled = set(found.scaled)
    found.unscaled = sorted(k[: -len(".weight")] for k, sk in keys.items()
                            if k.endswith(".weight") and src.dtype_name(sk) in _FP8_NAMES
                            and k[: -len(".weight")] not in scaled and DIT_QUANT_PATTERN.match(k[: -len(".weight")]))
    if not found.layers:
        return found
    names = {src.dtype_name(keys[f"{n}.weight"]) for n in found.layers}
    if len(names) > 1:
        raise CheckpointError(f"DiT: quantized layers mix storage types {sorted(names)}", src.describe())
    scheme = "fp8" if names.pop() in _FP8_NAMES else ("int8-wo" if requested == "int8-wo" else "int8")
    if tag is not None and SCHEMES[tag].qdtype != SCHEMES[scheme].qdtype:
        raise CheckpointError(f"format tag wanrt_quant={tag!r} does not match the stored "
                              f"{SCHEMES[scheme].qdtype} weights", src.describe())
    if requested is not None and requested != scheme:
        raise ValueError(f"the checkpoint is stored as {scheme!r}; quantization={requested!r} cannot be served from it "
                         "(load it with quantization=None or the stored scheme)")
    found.scheme = scheme
    return found


def fp8_gemm_supported(device) -> bool:
    """``torch._scaled_mm`` in fp8 runs here: the CPU, or a CUDA GPU of compute capability >= 8.9."""
    device = torch.device(device)
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------
def vae_config_from_shapes(shapes: dict[str, tuple[int, ...]], *, file=None):
    """Infer a ``VAEConfig`` from official-key tensor shapes (``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` carry no config).

    Wan2.1 (flat) layout: walks ``encoder.downsamples.N``: residual blocks (``.residual.2.weight``), attention blocks
    (``.to_qkv.weight``) and resamples (``.resample.1.weight``, with ``.time_conv.weight`` when the
    resample also halves time) give num_res_blocks, dim_mult, attn_scales and temporal_downsample.

    Wan2.2 (residual) layout, recognized by nested ``encoder.downsamples.I.downsamples.K`` keys: one stage per
    ``I``, its residual blocks and resample inside. Both: the patch size from the input channels of
    ``encoder.conv1.weight`` (``3 p²``: 12 -> 2), ``decoder_base_dim`` from ``decoder.head.0.gamma`` (the last
    decoder stage has ``decoder_base_dim * dim_mult[0]`` channels), and the published latent mean/std for
    ``z_dim`` 16 (Wan2.1) or 48 (Wan2.2).

    Raises:
        CheckpointError: a key the inference needs is absent, or the shapes fit no Wan-VAE layout (names
            ``file``, the weights, and the key).
    """
    from ..models.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, VAEConfig

    key = "encoder.conv1.weight"
    try:
        base, in_ch = shapes[key][:2]
        key = "conv2.weight"
        z_dim = shapes[key][0]
        residual = any(k.startswith("encoder.downsamples.") and ".downsamples." in k[len("encoder.downsamples."):]
                       for k in shapes)
        key = None
        if residual:
            num_res_blocks, dim_mult, temporal = _residual_vae_stages(shapes)
            attn_scales: list[float] = []
        else:
            idx = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")})
            levels: list[list[str]] = [[]]
            temporal = []
            for i in idx:
                p = f"encoder.downsamples.{i}."
                if p + "resample.1.weight" in shapes:
                    temporal.append(p + "time_conv.weight" in shapes)
                    levels.append([])
                elif p + "to_qkv.weight" in shapes:
                    levels[-1].append("attn")
                else:
                    levels[-1].append(p + "residual.6.weight")
            dim_mult, attn_scales = [], []
            for li, level in enumerate(levels):
                res = [k for k in level if k != "attn"]
                dim_mult.append(shapes[res[-1]][0] // base)
                if "attn" in level:
                    attn_scales.append(1.0 / 2**li)
            num_res_blocks = len([k for k in levels[0] if k != "attn"])
        key = "decoder.head.0.gamma"
        dec_dim = shapes[key][0] // dim_mult[0]
    except (KeyError, IndexError, ValueError) as e:
        key = e.args[0] if isinstance(e, KeyError) and e.args else key
        raise CheckpointError(f"cannot infer the VAE architecture from the keys (missing {e})", file, key) from e
    patch = round((in_ch / 3) ** 0.5)
    if 3 * patch * patch != in_ch:
        raise CheckpointError(f"encoder.conv1.weight has {in_ch} input channels, not 3 * patch_size**2", file,
                              "encoder.conv1.weight")
    stats = {16: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), 48: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}
    if z_dim not in stats:
        raise CheckpointError(f"z_dim={z_dim}: no published latent mean/std (16 for Wan2.1, 48 for Wan2.2)", file,
                              "conv2.weight")
    try:
        return VAEConfig(
            base_dim=base, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=num_res_blocks,
            attn_scales=tuple(attn_scales), temporal_downsample=tuple(temporal),
            latents_mean=stats[z_dim][0], latents_std=stats[z_dim][1], is_residual=residual, patch_size=patch,
            decoder_base_dim=None if dec_dim == base else dec_dim,
        )
    except ValueError as e:
        raise CheckpointError(f"the VAE keys give an inconsistent architecture: {e}", file) from e


def _vae_num_res_blocks(keys) -> int:
    """Residual blocks per encoder stage of a diffusers-named VAE's keys (for the key map of a file without config)."""
    flat = {k.split(".")[2] for k in keys if re.match(r"encoder\.down_blocks\.\d+\.norm1\.", k)}
    nested = {k.split(".")[4] for k in keys if re.match(r"encoder\.down_blocks\.0\.resnets\.\d+\.", k)}
    if nested:
        return len(nested)
    # Wan2.1: stage 0 is the blocks before the first resample (encoder.down_blocks.N.resample.*)
    resamples = sorted(int(k.split(".")[2]) for k in keys if re.match(r"encoder\.down_blocks\.\d+\.resample\.", k))
    return resamples[0] if resamples else max(1, len(flat))


def _residual_vae_stages(shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[int], list[bool]]:
    """``(num_res_blocks, dim_mult, temporal_downsample)`` of a Wan2.2 (residual) encoder's official keys.

    Raises:
        KeyError: a key the walk needs (stage 0's residual blocks, ``encoder.conv1.weight``).
    """
    base = shapes["encoder.conv1.weight"][0]
    stages = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")})
    if stages != list(range(len(stages))) or len(stages) < 2:
        raise KeyError(f"encoder.downsamples.{len(stages)}.downsamples.0.residual.6.weight")
    dim_mult: list[int] = []
    temporal: list[bool] = []
    num_res_blocks = 0
    for i in stages:
        p = f"encoder.downsamples.{i}.downsamples."
        res = sorted({int(k[len(p):].split(".")[0]) for k in shapes if k.startswith(p) and ".residual." in k})
        if not res:
            raise KeyError(p + "0.residual.6.weight")
        if i == 0:
            num_res_blocks = len(res)
        dim_mult.append(shapes[f"{p}{res[-1]}.residual.6.weight"][0] // base)
        if i != stages[-1]:
            if f"{p}{num_res_blocks}.resample.1.weight" not in shapes:
                raise KeyError(f"{p}{num_res_blocks}.resample.1.weight")
            temporal.append(f"{p}{num_res_blocks}.time_conv.weight" in shapes)
    return num_res_blocks, dim_mult, temporal


def load_vae(path, device=None, dtype=torch.float32):
    """Load the Wan2.1 or Wan2.2 causal 3D VAE (the architecture comes from the keys or the diffusers config).

    Args:
        path: ``Wan2.1_VAE.pth`` or ``Wan2.2_VAE.pth``, an official checkpoint folder holding one, a diffusers
            pipeline folder, or a diffusers ``vae/`` folder (config.json + diffusion_pytorch_model.safetensors).
        device: target device (default: CUDA when available, else CPU).
        dtype: weight and compute dtype (the official VAE runs in float32, the default).

    Returns:
        ``WanVAE``: ``.encode(video [B,3,F,H,W] in [-1,1])`` → normalized latents
        ``[B,z,1+(F-1)/4,H/s,W/s]`` (z=16, s=8 for Wan2.1; z=48, s=16 for Wan2.2); ``.decode(latents)`` → video
        in [-1,1].

    Raises:
        FileNotFoundError, LayoutError, CheckpointError: as for :func:`load_transformer`.
    """
    from ..models.vae import VAEConfig, WanVAE
    from .keymap_vae import vae_key_mapper

    path, dtype = _check_path_and_dtype(path, dtype)
    cfg = None
    if path.is_dir():
        if (path / "config.json").is_file() and "z_dim" in read_json(path / "config.json"):
            folder = path
        else:
            layout = detect_layout(path)
            if layout.vae is None:
                raise LayoutError(f"{path}: no VAE found (expected {OFFICIAL_VAE}, {OFFICIAL_VAE22} or a vae/ folder)")
            folder = layout.vae
        if folder.is_dir():
            cfg = VAEConfig.from_diffusers_config(read_json(folder / "config.json"))
            weights = folder / "diffusion_pytorch_model.safetensors"
            if not weights.is_file() and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file():
                weights = folder / "diffusion_pytorch_model.safetensors.index.json"
        else:
            weights = folder
    else:
        weights = path
    with open_tensor_source(weights) as src:
        keys = src.keys()
        diffusers = any(k.startswith(("quant_conv", "post_quant_conv")) or ".conv_in." in k or "up_blocks" in k for k in keys)
        if diffusers:
            # without a config.json (a bare file), the nested stage names tell the Wan2.2 layout apart
            residual = any(re.match(r"(encoder\.down_blocks\.\d+\.resnets|decoder\.up_blocks\.\d+\.upsampler\.)", k)
                           for k in keys)
            mapper = vae_key_mapper("official", cfg or SimpleNamespace(num_res_blocks=_vae_num_res_blocks(keys),
                                                                        attn_scales=(), is_residual=residual))
        else:
            mapper = None
        if cfg is None:
            shapes = {(mapper(k) if mapper else k): s for k, s in src.shapes().items()}
            cfg = vae_config_from_shapes(shapes, file=src.describe())
            if diffusers:
                mapper = vae_key_mapper("official", cfg)
        with torch.device("meta"):
            vae = WanVAE(cfg)
        load_into_module(vae, src, to_official=mapper, device=_device(device), dtype=dtype,
                         keep_fp32=WanVAE.keep_fp32, what="VAE")
    return vae


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------
def load_tokenizer(folder: str | Path):
    """Load a tokenizer folder through transformers' AutoTokenizer (local files only).

    Raises:
        LayoutError: the folder is missing or transformers cannot read it.
        SymlinkLoopError: the folder or a file in it is a symlink loop (a CheckpointError: "symlink loop at
            PATH"; transformers would skip such a file and build a tokenizer without it).
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    check_folder_links(folder)
    if not folder.is_dir():
        raise LayoutError(f"tokenizer folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise LayoutError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from e


def load_text_encoder(path, device=None, dtype=torch.bfloat16, *, tokenizer=None, text_len: int = 512):
    """Load the UMT5-XXL text encoder and its tokenizer.

    Args:
        path: an official checkpoint folder (``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/``),
            that ``.pth`` file (tokenizer from ``google/umt5-xxl/`` beside it), a diffusers pipeline folder
            (``text_encoder/`` + ``tokenizer/``), or a transformers ``UMT5EncoderModel`` folder.
        device: target device (default: CUDA when available, else CPU).
        dtype: weight dtype (bf16 as the official code; float32 for reference checks).
        tokenizer: a tokenizer folder overriding the detected one.
        text_len: tokens per prompt after padding/truncation (512).

    Returns:
        ``TextEncoder`` with ``.encode(list[str]) -> list[Tensor [L_i, dim]]``, trimmed to the real tokens.

    Raises:
        FileNotFoundError, LayoutError, CheckpointError: as for :func:`load_transformer`.
    """
    from ..models.t5 import TextEncoder

    path, dtype = _check_path_and_dtype(path, dtype)
    hf_cfg = None
    tok_dir = Path(tokenizer) if tokenizer is not None else None
    if path.is_file() and path.suffix == ".safetensors":  # a single file (ComfyUI's umt5_xxl_*.safetensors)
        return _load_text_encoder_file(path, device, dtype, tok_dir, text_len)
    if path.is_file():
        weights = path
        tok_dir = tok_dir or path.parent / OFFICIAL_TOKENIZER
    elif (path / "config.json").is_file() and "d_model" in read_json(path / "config.json"):
        folder = path
        hf_cfg = read_json(folder / "config.json")
        weights = _hf_weights(folder)
        tok_dir = tok_dir or folder.parent / "tokenizer"
    else:
        layout = detect_layout(path)
        if layout.text_encoder is None:
            raise LayoutError(f"{path}: no text encoder found (expected {OFFICIAL_T5} or a text_encoder/ folder)")
        if layout.text_encoder.is_dir():
            hf_cfg = read_json(layout.text_encoder / "config.json")
            weights = _hf_weights(layout.text_encoder)
        else:
            weights = layout.text_encoder
        tok_dir = tok_dir or layout.tokenizer
    if tok_dir is None:
        raise LayoutError(f"{path}: no tokenizer folder found")
    tok = load_tokenizer(tok_dir)
    with open_tensor_source(weights) as src:
        model = _umt5_from_source(src, hf_cfg, device, dtype)
    return TextEncoder(tok, model, text_len=text_len)


def _umt5_from_source(src, hf_cfg: dict | None, device, dtype):
    """The UMT5 encoder of a tensor source with official or transformers keys; its config from ``hf_cfg`` or from
    the shapes. Raises CheckpointError (an unknown key, and as :func:`load_into_module`)."""
    from ..models.t5 import UMT5Config, UMT5Encoder
    from .keymap_t5 import t5_to_official

    mapper = None
    if any(k.startswith(("encoder.", "shared.")) for k in src.keys()):
        def mapper(k: str):
            if k == "encoder.embed_tokens.weight" and "shared.weight" in src:
                return None  # tied duplicate of shared.weight
            return t5_to_official(k)
    if hf_cfg is not None:
        cfg = UMT5Config.from_hf_config(hf_cfg)
    else:
        shapes = {}
        for k, s in src.shapes().items():
            try:
                mk = mapper(k) if mapper else k
            except (KeyError, ValueError):
                raise CheckpointError("text encoder: unexpected key in checkpoint", src.file_of(k), k) from None
            if mk is not None:
                shapes[mk] = s
        cfg = UMT5Config.from_state_dict_shapes(shapes)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    load_into_module(model, src, to_official=mapper, device=_device(device), dtype=dtype,
                     keep_fp32=UMT5Encoder.keep_fp32, what="text encoder")
    return model


class _ScaledFp8Source:
    """A :class:`TensorSource` view of a ComfyUI "scaled fp8" file: every fp8 ``<layer>.weight`` comes back
    multiplied by its ``<layer>.scale_weight`` (float32), and the scales, the ``scaled_fp8`` marker and an embedded
    ``spiece_model`` are not keys of the view."""

    def __init__(self, src):
        self.src, self.metadata = src, src.metadata
        hidden = {"scaled_fp8", "spiece_model"}
        self._keys = [k for k in src.keys() if k not in hidden and not k.endswith(".scale_weight")]

    def keys(self):
        return list(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def shape(self, key):
        return self.src.shape(key)

    def shapes(self):
        return {k: self.src.shape(k) for k in self._keys}

    def dtype_name(self, key):
        return "F32" if self.src.dtype_name(key).startswith("F8") else self.src.dtype_name(key)

    def file_of(self, key):
        return self.src.file_of(key)

    def describe(self):
        return self.src.describe()

    def get(self, key):
        t = self.src.get(key)
        if self.src.dtype_name(key).startswith("F8"):
            scale = key[: -len("weight")] + "scale_weight"
            if scale not in self.src:
                raise CheckpointError("an fp8 weight without its scale_weight", self.src.file_of(key), scale)
            t = t.float() * self.src.get(scale).float()
        return t


def _tokenizer_from_spiece(data: torch.Tensor, text_len: int):
    """A T5 tokenizer from the SentencePiece model bytes ComfyUI embeds in its text-encoder file (``spiece_model``,
    uint8), written to a temporary folder and read by transformers."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="wanrt-spiece-"))
    (folder / "spiece.model").write_bytes(data.numpy().tobytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": text_len}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return load_tokenizer(folder)


def _load_text_encoder_file(path: Path, device, dtype, tok_dir: Path | None, text_len: int):
    """The UMT5 encoder of a single safetensors file: transformers or official keys, stored in bf16/fp16/fp32 or as
    ComfyUI's scaled fp8 (dequantized at load); the tokenizer from the file's ``spiece_model`` tensor when it has
    one, else ``tok_dir`` (or ``google/umt5-xxl`` beside the file)."""
    from ..models.t5 import TextEncoder

    with open_tensor_source(path) as raw:
        scaled = "scaled_fp8" in raw or any(k.endswith(".scale_weight") for k in raw.keys())
        embedded = "spiece_model" in raw
        src = _ScaledFp8Source(raw) if scaled or embedded else raw
        if embedded:
            tok = _tokenizer_from_spiece(raw.get("spiece_model"), text_len)
        else:
            tok_dir = tok_dir or path.parent / OFFICIAL_TOKENIZER
            if not tok_dir.is_dir():
                raise LayoutError(f"{path}: the file carries no tokenizer (no spiece_model tensor) and no tokenizer "
                                  f"folder was given or found at {tok_dir}; pass tokenizer=<folder of google/umt5-xxl>")
            tok = load_tokenizer(tok_dir)
        model = _umt5_from_source(src, None, device, dtype)
    return TextEncoder(tok, model, text_len=text_len)


def _hf_weights(folder: Path) -> Path:
    for name in ("model.safetensors.index.json", "model.safetensors"):
        check_symlink_loop(folder / name)
        if (folder / name).is_file():
            return folder / name
    raise LayoutError(f"{folder}: no model.safetensors or model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------
# Image encoder (CLIP ViT-H/14 of I2V/FLF2V)
# ---------------------------------------------------------------------------------------------
def _is_clip_vision_config(cfg: dict) -> bool:
    """A transformers CLIP vision config.json (or a full CLIPConfig holding one)."""
    return cfg.get("model_type") in ("clip_vision_model", "clip") or (
        "hidden_size" in cfg and "patch_size" in cfg and "num_hidden_layers" in cfg
    )


def _resolve_image_encoder(path: Path) -> tuple[Path, dict | None]:
    """(weights entry file, transformers config dict or None) for any accepted image-encoder path."""
    from .layout import OFFICIAL_CLIP

    if path.is_file():
        return path, None
    cfg_path = path / "config.json"
    if cfg_path.is_file():
        raw = read_json(cfg_path)
        if _is_clip_vision_config(raw):
            return _hf_weights(path), raw
    layout = detect_layout(path)
    if layout.image_encoder is None:
        expected = OFFICIAL_CLIP if layout.kind == "official" else "an image_encoder/ folder"
        raise LayoutError(
            f"{path}: no image encoder found (expected {expected}); only image-to-video and first-last-frame "
            "checkpoints (i2v, flf2v) have one, text-to-video checkpoints do not"
        )
    if layout.image_encoder.is_dir():
        folder = layout.image_encoder
        if not (folder / "config.json").is_file():
            raise LayoutError(f"{folder}: missing config.json for the image encoder")
        return _hf_weights(folder), read_json(folder / "config.json")
    return layout.image_encoder, None


def load_image_encoder(path, device=None, dtype=torch.float16, *, num_heads: int | None = None):
    """Load the CLIP ViT-H/14 image encoder of Wan2.1 I2V/FLF2V (its visual tower up to block 31 of 32).

    Args:
        path: an official checkpoint folder holding ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``,
            that ``.pth`` file (the whole XLM-RoBERTa CLIP; the text tower, ``post_norm``, ``head`` and the
            last block are skipped), a diffusers pipeline folder (``image_encoder/``), a transformers
            ``CLIPVisionModel`` folder (config.json with ``model_type "clip_vision_model"`` and
            ``model.safetensors`` or its shard index), or a single transformers-layout ``.safetensors``
            file (keys with or without ``vision_model.``; shape-inferred config).
        device: target device (default: CUDA when available, else CPU).
        dtype: weight and compute dtype: float16 (the default) as the official ``clip_dtype``; float32 for
            reference checks; None keeps the stored dtype. LayerNorm parameters stay float32
            (``CLIPVisionTower.keep_fp32``).
        num_heads: head count, overriding the transformers config or the shape rule of
            ``CLIPVisionConfig.from_official_shapes`` (official files do not store it: ``dim // 80``).

    Returns:
        ``ImageEncoder`` with ``.encode(images)``: ``[3, H, W]`` images in [-1, 1] ->
        ``[N, 257, 1280]`` in ``dtype`` (the official ``clip.visual(..., use_31_block=True)`` features).

    Raises:
        FileNotFoundError: the path does not exist.
        LayoutError: the folder is neither layout, holds both, or the checkpoint has no image encoder
            (text-to-video checkpoints have none).
        CheckpointError: missing/unexpected keys, shape mismatch, an integer tensor where a float one belongs,
            keys of neither CLIP layout, a corrupt file, an architecture that cannot be inferred, a shard index
            naming a file outside its folder, or a symlink loop (names the file and the key).
        ValueError: bad dtype, device, or transformers config (e.g. ``hidden_act`` other than ``"gelu"``).
    """
    import dataclasses

    from ..models.clip import CLIPVisionConfig, CLIPVisionTower, ImageEncoder
    from .keymap_clip import (
        HF_PREFIX,
        TransformersCLIPSource,
        clip_from_official,
        clip_to_transformers,
        is_transformers_clip_key,
    )

    path, dtype = _check_path_and_dtype(path, dtype)
    weights, hf_cfg = _resolve_image_encoder(path)
    target = _device(device)
    with open_tensor_source(weights) as raw_src:
        keys = raw_src.keys()
        if any(k.startswith("visual.") for k in keys):
            fmt, src = "official", raw_src
        elif any(is_transformers_clip_key(k) for k in keys):
            fmt = "transformers"
        else:
            raise CheckpointError("image encoder: neither official CLIP keys ('visual.*') nor transformers "
                                  "CLIPVisionModel keys", raw_src.describe(), keys[0] if keys else None)
        try:
            if hf_cfg is not None:
                cfg = CLIPVisionConfig.from_hf_config(hf_cfg)
                if num_heads is not None:
                    cfg = dataclasses.replace(cfg, num_heads=num_heads)
            elif fmt == "official":
                shapes = {k[len("visual."):]: s for k, s in raw_src.shapes().items() if k.startswith("visual.")}
                cfg = CLIPVisionConfig.from_official_shapes(shapes, num_heads=num_heads)
            else:  # a bare transformers file: our names, all layers (none dropped) for the shapes
                full = TransformersCLIPSource(raw_src, used_layers=1 << 30)
                cfg = CLIPVisionConfig.from_official_shapes(full.shapes(), num_heads=num_heads)
        except (KeyError, ValueError) as e:
            if hf_cfg is not None and not isinstance(e, KeyError):
                raise
            raise CheckpointError(f"image encoder: cannot infer the CLIP architecture ({type(e).__name__}: {e})",
                                  raw_src.describe()) from e
        if fmt == "official":
            def mapper(k: str):
                return clip_from_official(k, cfg.used_layers)

            def source_name(k: str) -> str:
                return "visual." + k
        else:
            src = TransformersCLIPSource(raw_src, cfg.used_layers)
            mapper = None
            prefix = HF_PREFIX if any(k.startswith(HF_PREFIX) for k in keys) else ""

            def source_name(k: str) -> str:
                return clip_to_transformers(k, prefix)[0]
        with torch.device("meta"):
            model = CLIPVisionTower(cfg)
        # Name a missing parameter as the checkpoint spells it (load_into_module would use the tower's name).
        present = {mapper(k) if mapper else k for k in src.keys() if _maps(mapper, k)}
        missing = [k for k in model.state_dict() if k not in present]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(f"image encoder: checkpoint lacks a parameter{more}", raw_src.describe(),
                                  source_name(missing[0]))
        load_into_module(model, src, to_official=mapper, device=target, dtype=dtype,
                         keep_fp32=CLIPVisionTower.keep_fp32, what="image encoder")
    log.info("image encoder: %s CLIP (%d of %d blocks, dim %d) from %s", fmt, cfg.used_layers, cfg.num_layers,
             cfg.dim, weights)
    return ImageEncoder(model, cfg)


def _maps(mapper, key: str) -> bool:
    """True when ``mapper`` (None = identity) maps ``key`` to a module key (not dropped, not unknown)."""
    if mapper is None:
        return True
    try:
        return mapper(key) is not None
    except (KeyError, ValueError):
        return False
