"""TensorRT engines for the exported VAE decoder step graphs, and a TensorRT decoder.

:func:`build_decoder_engine` turns the two ONNX graphs of :func:`wanrt.graph.onnx_vae.export_decoder_onnx`
into two serialized TensorRT engines (TensorRT 10 Python API: ``Builder``, ``OnnxParser``,
``build_serialized_network``), cached under ``cache_dir`` (the Engine passes ``$WANRT_CACHE_DIR/trt``, default ``~/.cache/wanrt/trt``) by a key over the
TensorRT version, the GPU, the precision mode and the ONNX graphs (their input/output shapes and
dtypes and the SHA-256 of both graph files, from the ONNX sidecar); an existing engine with the
same key is reused. Files, for ``name.onnx`` and key ``K`` (:func:`decoder_engine_key`):

* ``cache_dir/name-K.engine``: the steady-state step engine (what is returned),
* ``cache_dir/name-K.first.engine``: the first-step engine,
* ``cache_dir/name-K.json``: the ONNX sidecar with ``step_file``/``first_step_file``/``files`` pointing at
  the engines and an ``"engine"`` record (TensorRT version, GPU, precision, key); written last.

:class:`TensorRTDecoder` runs them with PyTorch CUDA tensors as the I/O bindings
(``set_tensor_address`` + ``execute_async_v3`` on the current PyTorch stream), ping-ponging two
sets of cache buffers between steps. Same ``decode``/``decode_stream`` API as ``WanVAE.decode``.

Precision: an fp32 ONNX with ``fp16=True`` builds with ``BuilderFlag.FP16`` and keeps the layers of
the RMS norms (the ONNX scopes that contain a ``ReduceL2``) in float32 (their sum of squares can
overflow fp16; ``PREFER_PRECISION_CONSTRAINTS``). An fp16 ONNX (``export_decoder_onnx(dtype=torch.float16)``)
builds a *strongly typed* network that follows the graph's own types (fp16 compute, float32
norms, as PyTorch runs the fp16 VAE); ``fp16`` is then irrelevant. ``fp16=False`` on an fp32 ONNX
builds a float32 engine (TensorRT may use TF32 for convolutions).

Only the missing-package error, the cache key and the reuse logic run without TensorRT and a GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from wanrt.graph.onnx_vae import _atomic_write_text, _file_info, _tmp_name, check_latents, companion_paths, load_layout
from wanrt.ops.backends import BackendUnavailableError

__all__ = [
    "TRT_INSTALL_HINT",
    "TensorRTDecoder",
    "build_decoder_engine",
    "decoder_engine_key",
    "engine_paths",
]

log = logging.getLogger("wanrt")

TRT_INSTALL_HINT = "pip install 'wanrt[trt]'"


def _import_tensorrt() -> Any:
    """``import tensorrt``, or :class:`BackendUnavailableError` with the install hint."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not loadable
        raise BackendUnavailableError(
            f"the TensorRT VAE decoder needs TensorRT >= 10 and an NVIDIA GPU: {TRT_INSTALL_HINT} ({e})"
        ) from e
    return trt


def require_tensorrt() -> None:
    """Raise ``BackendUnavailableError`` (with ``pip install 'wanrt[trt]'``) unless ``tensorrt`` imports."""
    _import_tensorrt()


def _gpu_name(device: torch.device | str | None = None) -> str:
    """``"<name> (sm_XY)"`` of the CUDA device TensorRT builds for (part of the engine key)."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU, and PyTorch sees none")
    device = torch.device(device if device is not None else "cuda")
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def decoder_engine_key(info: dict[str, Any], *, trt_version: str, gpu_name: str, fp16: bool) -> str:
    """The cache key (16 hex digits) of the engines built from an ONNX export. Pure.

    Hashes the TensorRT version, the GPU name, the precision mode (``"fp16"``, ``"fp32"`` or
    ``"strongly-typed"`` for an fp16 ONNX, where ``fp16`` does not matter) and, from the ONNX sidecar
    ``info``: the sidecar format version, the compute dtype, every graph input/output (name, shape,
    dtype) of both graphs, and the files' sizes and SHA-256 (so re-exported weights get new engines).
    Other sidecar entries (wanrt/torch versions, paths) do not change the key.
    """
    payload = {
        "tensorrt": str(trt_version),
        "gpu": str(gpu_name),
        "precision": _precision(info, fp16),
        "format_version": info.get("format_version"),
        "dtype": info.get("dtype"),
        "first_step": info.get("first_step"),
        "step": info.get("step"),
        "files": sorted(((v or {}).get("bytes"), (v or {}).get("sha256")) for v in (info.get("files") or {}).values()),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _precision(info: dict[str, Any], fp16: bool) -> str:
    if info.get("dtype") == "float16":
        return "strongly-typed"
    return "fp16" if fp16 else "fp32"


def engine_paths(onnx_path: str | os.PathLike, key: str, cache_dir: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(step_engine, first_step_engine, sidecar)`` for an ONNX step graph and a key."""
    engine = Path(cache_dir) / f"{Path(onnx_path).stem}-{key}.engine"
    first, sidecar = companion_paths(engine)
    return engine, first, sidecar


def _write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _build_serialized(trt: Any, onnx_file: Path, *, precision: str, workspace_bytes: int | None) -> bytes:
    """Parses ``onnx_file`` and returns the serialized engine (TensorRT 10 API)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if precision == "strongly-typed":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        # The RMS norms: every layer of an ONNX scope (".../residual.0/") that holds a ReduceL2.
        scopes = {layer.name[: layer.name.rfind("/") + 1] for layer in layers if "ReduceL2" in layer.name}
        scopes.discard("")
        floats = (trt.float32, trt.float16)
        for layer in layers:
            if not any(layer.name.startswith(s) for s in scopes):
                continue
            outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
            if outputs and all(o.dtype in floats for o in outputs):  # not the shape computations
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_file} (see the TensorRT log above)")
    return bytes(memoryview(serialized))


def build_decoder_engine(
    onnx_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    fp16: bool = True,
    *,
    workspace_gb: float | None = None,
    force: bool = False,
) -> Path:
    """Builds (or reuses) the TensorRT engines of an exported decoder; returns the step engine's path.

    Args:
        onnx_path: the step graph from :func:`~wanrt.graph.onnx_vae.export_decoder_onnx` (with its
            ``.first.onnx`` and ``.json`` companions).
        cache_dir: where engines are kept (created if needed); None: ``wanrt.paths.cache_root() / "trt"``.
        fp16: for an fp32 ONNX, build with TensorRT's FP16 mode (norms kept in float32); ignored for
            an fp16 ONNX (strongly typed). See the module docstring.
        workspace_gb: cap on TensorRT's builder workspace (default: TensorRT's, the GPU memory).
        force: rebuild even when engines with the same key exist.

    Returns:
        ``cache_dir/<onnx stem>-<key>.engine``; its ``.first.engine`` and ``.json`` companions sit
        next to it (:func:`engine_paths`). Pass it to :class:`TensorRTDecoder`.

    Raises:
        BackendUnavailableError: TensorRT is not installed (hint ``pip install 'wanrt[trt]'``) or
            there is no CUDA GPU.
        FileNotFoundError, ValueError: missing or foreign ONNX files (see ``load_layout``).
        RuntimeError: TensorRT failed to parse or build.
    """
    trt = _import_tensorrt()
    gpu = _gpu_name()
    onnx_path = Path(onnx_path)
    info = load_layout(onnx_path)
    precision = _precision(info, fp16)
    key = decoder_engine_key(info, trt_version=trt.__version__, gpu_name=gpu, fp16=fp16)
    if cache_dir is None:
        from ..paths import cache_root

        cache_dir = cache_root() / "trt"
    engine, first, sidecar = engine_paths(onnx_path, key, cache_dir)
    if not force and engine.is_file() and first.is_file() and sidecar.is_file():
        log.info("reusing TensorRT decoder engine %s", engine)
        return engine
    engine.parent.mkdir(parents=True, exist_ok=True)
    first_onnx, _ = companion_paths(onnx_path)
    workspace = int(workspace_gb * (1 << 30)) if workspace_gb else None
    for src, dst in ((first_onnx, first), (onnx_path, engine)):
        log.info("building TensorRT engine %s from %s (%s)", dst, src, precision)
        _write_bytes_atomic(dst, _build_serialized(trt, src, precision=precision, workspace_bytes=workspace))
    out = dict(info)
    out["step_file"], out["first_step_file"] = engine.name, first.name
    out["files"] = {p.name: _file_info(p) for p in (engine, first)}
    out["engine"] = {
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "precision": precision,
        "key": key,
        "onnx": str(onnx_path),
        "onnx_files": info.get("files"),
    }
    _atomic_write_text(sidecar, json.dumps(out, indent=1, sort_keys=True) + "\n")
    return engine


class _Cuda:
    """The CUDA calls of :class:`TensorRTDecoder` in one place (tests replace it to run on the CPU)."""

    @staticmethod
    def available() -> bool:
        return torch.cuda.is_available()

    @staticmethod
    def default_device() -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    @staticmethod
    def device_scope(device: torch.device) -> Any:
        return torch.cuda.device(device)

    @staticmethod
    def new_stream(device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    @staticmethod
    def current_stream(device: torch.device) -> Any:
        return torch.cuda.current_stream(device)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for name, tdt in (("bfloat16", torch.bfloat16), ("int64", torch.int64)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    if dtype not in table:
        raise RuntimeError(f"unsupported TensorRT tensor dtype {dtype}")
    return table[dtype]


class _EngineRunner:
    """One deserialized engine, its execution context and its I/O tensor names, shapes and dtypes."""

    def __init__(self, trt: Any, runtime: Any, path: Path) -> None:
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT could not load {path} (built by another TensorRT version or for another GPU?); "
                "rebuild it with build_decoder_engine(..., force=True)"
            )
        self.context = self.engine.create_execution_context()
        self.inputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            spec = (tuple(self.engine.get_tensor_shape(name)), _torch_dtype(trt, self.engine.get_tensor_dtype(name)))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[name] = spec

    def run(self, tensors: dict[str, torch.Tensor], stream: Any) -> None:
        """Enqueues the engine on ``stream`` with ``tensors`` (name -> CUDA tensor) as its I/O."""
        for name in (*self.inputs, *self.outputs):
            self.context.set_tensor_address(name, tensors[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")


class TensorRTDecoder:
    """Decodes latents with the engines of :func:`build_decoder_engine`, on a CUDA device.

    Allocates once: the ``z`` and ``frames`` buffers and two sets of cache tensors (the cache
    ping-pongs between them: a step reads one set and writes the other, since TensorRT I/O tensors
    must not alias), so GPU memory holds twice the cache (about 2 x 3.7 GB for float32 480x832).
    Work is enqueued on PyTorch's current stream of ``device``. One decode at a time per instance.

    Args:
        engine_path: the step engine returned by :func:`build_decoder_engine` (its ``.first.engine``
            and ``.json`` companions must sit next to it).
        device: the CUDA device the engines were built for (default: the current one).

    Attributes:
        info: the engine sidecar; ``batch``, ``height``, ``width``, ``latent_height``,
            ``latent_width``, ``z_dim``, ``temporal_factor`` as in :class:`~wanrt.graph.onnx_vae.OnnxDecoder`.

    Raises:
        BackendUnavailableError: TensorRT is not installed or there is no CUDA GPU.
        FileNotFoundError, ValueError: missing or foreign files.
        RuntimeError: an engine does not load, or its I/O differs from the sidecar.
    """

    def __init__(self, engine_path: str | os.PathLike, *, device: torch.device | str | None = None) -> None:
        trt = _import_tensorrt()
        if not _Cuda.available():
            raise BackendUnavailableError("TensorRTDecoder needs a CUDA GPU, and PyTorch sees none")
        self.path = Path(engine_path)
        self.info = info = load_layout(self.path)
        self.device = torch.device(device) if device is not None else _Cuda.default_device()
        first_path, _ = companion_paths(self.path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with _Cuda.device_scope(self.device):
            self._first = _EngineRunner(trt, self._runtime, first_path)
            self._step = _EngineRunner(trt, self._runtime, self.path)
        self.batch: int = info["batch"]
        self.height: int = info["height"]
        self.width: int = info["width"]
        self.latent_height: int = info["latent_height"]
        self.latent_width: int = info["latent_width"]
        self.z_dim: int = info["z_dim"]
        self.temporal_factor: int = info["temporal_factor"]
        self._cache_in = [c["input"] for c in info["cache"]]
        self._cache_out = [c["output"] for c in info["cache"]]
        self._check_io()

        def alloc(spec: tuple[tuple[int, ...], torch.dtype]) -> torch.Tensor:
            return torch.empty(spec[0], dtype=spec[1], device=self.device)

        self._z = alloc(self._step.inputs["z"])
        self._first_frames = alloc(self._first.outputs["frames"])
        self._step_frames = alloc(self._step.outputs["frames"])
        self._caches = [[alloc(self._step.inputs[n]) for n in self._cache_in] for _ in range(2)]
        self._stream = _Cuda.new_stream(self.device)  # TensorRT work runs here, ordered with the current stream

    def __repr__(self) -> str:
        return (f"TensorRTDecoder({str(self.path)!r}, batch={self.batch}, {self.height}x{self.width}, "
                f"precision={self.info.get('engine', {}).get('precision')}, device={self.device})")

    def _check_io(self) -> None:
        for where, runner, part in (("first-step", self._first, "first_step"), ("step", self._step, "step")):
            for kind, got in (("inputs", runner.inputs), ("outputs", runner.outputs)):
                want = {d["name"]: tuple(d["shape"]) for d in self.info[part][kind]}
                have = {name: shape for name, (shape, _) in got.items()}
                if want != have:
                    raise RuntimeError(f"the {where} engine's {kind} {have} differ from the sidecar's {want}")
        for n_in, n_out in zip(self._cache_in, self._cache_out):
            # The first step writes the buffers the step reads; so does each step for the next.
            if not self._first.outputs[n_out] == self._step.outputs[n_out] == self._step.inputs[n_in]:
                raise RuntimeError(f"cache tensors {n_in}/{n_out} differ in shape or dtype between the engines")

    def decode_stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yields the decoded video chunk by chunk: ``[B, 3, 1, H, W]``, then ``[B, 3, temporal_factor, H, W]``
        per latent frame; float32 in [-1, 1] on this decoder's CUDA device (fresh tensors).

        Raises:
            ValueError: wrong rank, channels, batch or latent size (raised by this call, before any step).
        """
        check_latents(self.info, latents)
        return self._iter_frames(latents)

    def _iter_frames(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        with _Cuda.device_scope(self.device):
            current = _Cuda.current_stream(self.device)
            lat = latents.detach().to(self.device, torch.float32)
            for t in range(lat.shape[2]):
                self._z.copy_(lat[:, :, t : t + 1])  # on the current stream
                if t == 0:
                    runner, frames = self._first, self._first_frames
                    io = {"z": self._z, "frames": frames, **dict(zip(self._cache_out, self._caches[0]))}
                else:
                    runner, frames = self._step, self._step_frames
                    src, dst = self._caches[(t - 1) % 2], self._caches[t % 2]  # ping-pong
                    io = {"z": self._z, "frames": frames, **dict(zip(self._cache_in, src)),
                          **dict(zip(self._cache_out, dst))}
                self._stream.wait_stream(current)  # z is written
                runner.run(io, self._stream)
                current.wait_stream(self._stream)  # frames and caches are written
                yield frames.clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decodes normalized latents like ``WanVAE.decode``.

        Args:
            latents: ``[B, z_dim, T, h, w]`` with the built batch and latent size, any float dtype/device.

        Returns:
            ``[B, 3, 1 + temporal_factor * (T - 1), H, W]`` float32 in [-1, 1] on the decoder's device.

        Raises:
            ValueError: wrong rank, channels, batch or latent size.
        """
        return torch.cat(list(self.decode_stream(latents)), dim=2)
