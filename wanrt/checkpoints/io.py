"""Lazy tensor sources (safetensors, sharded safetensors, torch pickles) and loading into meta modules.

Loading never holds two copies of the weights: a module is built on the ``meta`` device, then each
tensor is read from its file (memory-mapped), converted to its target dtype on its target device and
handed to ``load_state_dict(assign=True)``. Every error names the file and, where there is one, the key.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing pieces, corrupt, or does not fit the model.

    Attributes:
        file: the file concerned (or None).
        key: the tensor key concerned (or None).
    """

    def __init__(self, message: str, file: str | os.PathLike | None = None, key: str | None = None):
        self.file = str(file) if file is not None else None
        self.key = key
        where = []
        if file is not None:
            where.append(f"file {self.file}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(message + (f" ({', '.join(where)})" if where else ""))


class SymlinkLoopError(CheckpointError):
    """A path of the checkpoint is a symbolic link that leads back to itself (``a -> a``, ``a -> b -> a``).

    The message is ``symlink loop at PATH``, PATH being the first link on the way that loops; ``file`` is PATH.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(f"symlink loop at {path} (the link leads back to itself; fix or remove it)")
        self.file = str(path)


def _is_loop(e: OSError) -> bool:
    return e.errno == errno.ELOOP or getattr(e, "winerror", None) == 1921  # ERROR_CANT_RESOLVE_FILENAME


def check_symlink_loop(path: str | os.PathLike) -> None:
    """Raise :class:`SymlinkLoopError` when ``path``, or a folder on the way to it, is a symlink loop.

    A missing path passes (its caller reports it). ``Path.exists()``/``is_file()`` answer False for a loop,
    which would read as "missing" or "neither layout"; this names the loop instead.

    Raises:
        SymlinkLoopError: names the first looping component of ``path``.
    """
    p = Path(path)
    try:
        os.stat(p)
        return
    except OSError as e:
        if not _is_loop(e):
            return
    parts = p.parts
    for i in range(1, len(parts) + 1):
        prefix = Path(*parts[:i])
        try:
            os.stat(prefix)
        except OSError as e:
            if _is_loop(e):
                raise SymlinkLoopError(prefix) from None
            break
    raise SymlinkLoopError(p)


def check_folder_links(folder: str | os.PathLike) -> None:
    """:func:`check_symlink_loop` on ``folder`` and on every symbolic link directly inside it.

    Raises:
        SymlinkLoopError: names the looping entry.
    """
    folder = Path(folder)
    check_symlink_loop(folder)
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            check_symlink_loop(entry)


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8",
                      torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
_INTEGER_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                  "U32": "uint32", "I64": "int64", "U64": "uint64"}


def _integer_dtype(name: str) -> str | None:
    """The torch name of an integer or bool stored dtype (``TensorSource.dtype_name``), None for the others."""
    if name in _INTEGER_NAMES:
        return _INTEGER_NAMES[name]
    dt = getattr(torch, name[len("torch."):], None) if name.startswith("torch.") else None
    if isinstance(dt, torch.dtype) and not dt.is_floating_point and not dt.is_complex:
        return name[len("torch."):]
    return None


class TensorSource:
    """A read-only, lazily loaded ``key -> tensor`` view over one or more checkpoint files.

    Use :func:`open_tensor_source` to build one. ``shape(key)`` reads only headers; ``get(key)``
    reads one tensor. Call ``close()`` (or use it as a context manager) to release file handles.
    """

    def __init__(self) -> None:
        self._file_of: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        self._getters: dict[Path, Callable[[str], torch.Tensor]] = {}
        self._closers: list[Callable[[], None]] = []
        self.metadata: dict[str, str] = {}

    # -- construction -------------------------------------------------------------------------
    def _add_safetensors(self, path: Path, only: Iterable[str] | None = None) -> None:
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            raise CheckpointError("checkpoint file not found", path)
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            handle.__enter__()
        except SafetensorError as e:
            raise CheckpointError(f"corrupt or truncated safetensors file: {e}", path) from e
        except Exception as e:  # pragma: no cover - unusual I/O errors
            raise CheckpointError(f"cannot open safetensors file: {e}", path) from e
        self._closers.append(lambda h=handle: h.__exit__(None, None, None))
        self.metadata.update(handle.metadata() or {})
        keys = handle.keys() if only is None else list(only)
        available = set(handle.keys())
        for k in keys:
            if k not in available:
                raise CheckpointError("the shard index names this key but the shard does not hold it", path, k)
            if k in self._file_of and self._file_of[k] != path:
                raise CheckpointError(f"key also stored in {self._file_of[k]}", path, k)
            self._file_of[k] = path
            sl = handle.get_slice(k)
            self._shape[k] = tuple(sl.get_shape())
            self._dtype[k] = str(sl.get_dtype())

        def getter(key: str, h=handle, p=path) -> torch.Tensor:
            try:
                return h.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor: {e}", p, key) from e

        self._getters[path] = getter

    def _add_pickle(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError("checkpoint file not found", path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"corrupt, truncated or unsafe torch checkpoint: {e}", path) from e
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError("expected a state dict of tensors", path)
        for k, v in obj.items():
            self._file_of[k] = path
            self._shape[k] = tuple(v.shape)
            self._dtype[k] = _SAFETENSORS_DTYPE.get(v.dtype, str(v.dtype))
        self._getters[path] = lambda key, d=obj: d[key]

    # -- access -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """All tensor keys, in file order."""
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def __len__(self) -> int:
        return len(self._file_of)

    def file_of(self, key: str) -> Path:
        """The file that stores ``key``."""
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key``, read from the header only."""
        return self._shape[key]

    def dtype_name(self, key: str) -> str:
        """The stored dtype of ``key`` as safetensors names it ("BF16", "F8_E4M3", "I8", ...), header only."""
        return self._dtype[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``key -> shape`` for every tensor (headers only)."""
        return dict(self._shape)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype). Raises CheckpointError naming the file and key."""
        if key not in self._file_of:
            raise CheckpointError("key not in checkpoint", self.describe(), key)
        return self._getters[self._file_of[key]](key)

    def describe(self) -> str:
        """A short name of the files behind this source, for messages."""
        files = sorted({str(p) for p in self._file_of.values()})
        return files[0] if len(files) == 1 else f"{len(files)} files under {os.path.commonpath(files)}" if files else "<empty>"

    def close(self) -> None:
        """Release the file handles."""
        for c in self._closers:
            c()
        self._closers.clear()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shard_path(index: Path, shard: str, key: str, homes: tuple[Path, ...]) -> Path:
    """The file that the index entry ``key -> shard`` names, refused unless it lies inside the index's folder.

    Raises:
        CheckpointError: ``shard`` is absolute or has a ``..`` part, or is a symbolic link resolving outside
            ``homes``; names the index file and the entry.
        SymlinkLoopError: the shard is a symlink loop.
    """
    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"shard index entry {key!r} -> {shard!r} {why}; an index may only name shard "
                               f"files inside its own folder {index.parent}", index, key)

    parts = shard.replace("\\", "/").split("/")
    if shard.startswith(("/", "\\")) or os.path.isabs(shard) or (len(shard) > 1 and shard[1] == ":"):
        raise refuse("is an absolute path")
    if ".." in parts:
        raise refuse("climbs out with '..'")
    shard_path = index.parent / shard
    check_symlink_loop(shard_path)
    if shard_path.exists():
        real = shard_path.resolve()
        if not any(real.is_relative_to(home) for home in homes):
            raise refuse(f"is a symbolic link to {real}, outside the folder")
    return shard_path


def open_tensor_source(path: str | os.PathLike) -> TensorSource:
    """Open a weights file lazily.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json`` shard index (every shard it names
            is opened), or a torch pickle (``.pth``/``.pt``/``.bin``, loaded with ``weights_only=True``
            and ``mmap=True``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: a shard named by the index is missing, a file is corrupt or truncated, the
            index is malformed, or an index entry names a file outside the index's folder (``..``, an
            absolute path, a symbolic link leading out); the message names the file (and the key).
        SymlinkLoopError: ``path`` or a shard is a symlink loop (a CheckpointError: "symlink loop at PATH").
    """
    path = Path(path)
    check_symlink_loop(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    src = TensorSource()
    try:
        if path.name.endswith(".index.json"):
            try:
                index = json.loads(path.read_text())
                weight_map: Mapping[str, str] = index["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"malformed shard index (need a 'weight_map'): {e}", path) from e
            if not isinstance(weight_map, Mapping):
                raise CheckpointError("malformed shard index: 'weight_map' must map tensor keys to shard file "
                                      f"names, got {type(weight_map).__name__}", path)
            by_shard: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                if not isinstance(shard, str) or not shard:
                    raise CheckpointError(f"malformed shard index: entry {key!r}: {shard!r} is not a file name",
                                          path, key)
                by_shard.setdefault(shard, []).append(key)
            # A shard may live in the index's folder, or where the index itself really is (the Hugging Face
            # cache links every file of a snapshot folder to its blobs/ folder).
            homes = (path.parent.resolve(), path.resolve().parent)
            for shard, keys in by_shard.items():
                shard_path = _shard_path(path, shard, keys[0], homes)
                if not shard_path.is_file():
                    raise CheckpointError(
                        f"shard {shard!r} named by the index is missing (it holds {len(keys)} keys, e.g. {keys[0]!r})",
                        shard_path,
                    )
                src._add_safetensors(shard_path, only=keys)
        elif path.suffix == ".safetensors":
            src._add_safetensors(path)
        else:
            src._add_pickle(path)
    except BaseException:
        src.close()
        raise
    return src


def _check_float_stored(source, key: str, what: str) -> None:
    """Refuse an integer/bool tensor (headers only) where the module holds a floating-point one.

    A view over another source that fuses several stored tensors into one (``TransformersCLIPSource``: q, k, v
    -> to_qkv) exposes ``source_keys(key)`` and ``source``; each stored part is checked and named as stored.
    """
    inner = getattr(source, "source", None) if hasattr(source, "source_keys") else None
    parts = [(inner, k) for k in source.source_keys(key)] if inner is not None else [(source, key)]
    for src, k in parts:
        integer = _integer_dtype(src.dtype_name(k))
        if integer is not None:
            hint = (" (int8 weights load only as a quantized checkpoint, with a <layer>.weight_scale beside each "
                    "weight: see wanrt.quant)" if integer == "int8" else "")
            raise CheckpointError(f"{what}: tensor stored as {integer}, an integer dtype, where the model expects "
                                  f"floating-point values{hint}", src.file_of(k), k)


def load_into_module(
    module: torch.nn.Module,
    source: TensorSource,
    *,
    to_official: Callable[[str], str | None] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp32: Callable[[str], bool] = lambda name: False,
    keep_stored: Callable[[str], bool] = lambda name: False,
    fill_missing: dict[str, torch.Tensor] | None = None,
    scalar_ok: Callable[[str], bool] = lambda name: False,
    defer: Callable[[str], bool] = lambda name: False,
    what: str = "model",
) -> torch.nn.Module:
    """Materialize a meta-device module from a tensor source, one tensor at a time.

    Args:
        module: built under ``torch.device("meta")``; its state-dict keys are the official keys.
        source: where the tensors are (see :func:`open_tensor_source`).
        to_official: maps a source key to the module's key; returning None drops the key
            (e.g. a tied duplicate). Identity when None.
        device: target device of every parameter.
        dtype: target dtype of floating-point parameters (None keeps the stored dtype), except those
            for which ``keep_fp32(name)`` is true, which become float32.
        keep_fp32: see above.
        keep_stored: parameters moved to ``device`` in their stored dtype (8-bit quantized weights).
        fill_missing: values for module keys the checkpoint does not have (e.g. unit scales of fp8 weights
            stored without one).
        scalar_ok: module keys that may come as a single value, broadcast to the parameter's shape
            (per-tensor quantization scales).
        defer: module keys checked (presence, shape, float-ness) but not read: they get a one-element placeholder
            of their shape and target dtype (``torch.zeros(()).expand(shape)``, no memory), for a reader that fills
            them later (disk placement, :mod:`wanrt.offload.disk`). Needs ``dtype`` for floating-point keys.
        what: a name for messages ("DiT", "VAE", ...).

    Returns:
        ``module``, with real tensors, in eval mode.

    Raises:
        CheckpointError: missing keys, unexpected keys, two source keys mapping to one module key, a
            shape mismatch, or an integer (or bool) tensor where the module holds a floating-point one
            (``keep_stored`` keys excepted); the message names the file and the key. All of these are
            checked from the headers before any tensor is read.
    """
    module_state = module.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in module_state.items()}
    expected_float = {k: v.is_floating_point() for k, v in module_state.items()}
    del module_state
    mapped: dict[str, str] = {}
    unexpected: list[str] = []
    for src_key in source.keys():
        try:
            key = to_official(src_key) if to_official else src_key
        except (KeyError, ValueError):  # the key map does not know this key
            unexpected.append(src_key)
            continue
        if key is None:
            continue
        if key in mapped:
            raise CheckpointError(
                f"{what}: keys {mapped[key]!r} and {src_key!r} both map to {key!r}", source.file_of(src_key), src_key
            )
        mapped[key] = src_key
        if key not in expected:
            unexpected.append(src_key)
    if unexpected:
        k = unexpected[0]
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{what}: unexpected key in checkpoint{more}", source.file_of(k), k)
    fill_missing = fill_missing or {}
    missing = [k for k in expected if k not in mapped and k not in fill_missing]
    if missing:
        more = f" and {len(missing) - 1} more ({', '.join(missing[1:4])}...)" if len(missing) > 1 else ""
        raise CheckpointError(f"{what}: checkpoint lacks a parameter{more}", source.describe(), missing[0])
    for key, shape in expected.items():
        if key not in mapped:
            continue
        src_key = mapped[key]
        if expected_float[key] and not keep_stored(key):
            _check_float_stored(source, src_key, what)
        stored = source.shape(src_key)
        if scalar_ok(key) and math.prod(stored) == 1:
            continue
        if stored != shape:
            raise CheckpointError(
                f"{what}: shape mismatch for {key!r}: checkpoint {list(source.shape(src_key))}, model {list(shape)}",
                source.file_of(src_key), src_key,
            )
    state: dict[str, torch.Tensor] = {}
    for key in expected:
        if key not in mapped:
            state[key] = fill_missing[key].to(device)
            continue
        if defer(key):
            if expected_float[key] and dtype is None and not keep_fp32(key):
                raise ValueError(f"{what}: deferred tensors need a target dtype ({key!r})")
            target = (torch.float32 if keep_fp32(key) else dtype) if expected_float[key] else \
                source.get(mapped[key]).dtype
            state[key] = torch.zeros((), dtype=target, device=device).expand(expected[key])
            continue
        t = source.get(mapped[key])
        if scalar_ok(key) and t.numel() == 1 and tuple(t.shape) != expected[key]:
            t = t.reshape(()).expand(expected[key]).clone()
        if keep_stored(key):
            t = t.to(device=device)
        elif t.is_floating_point():
            target = torch.float32 if keep_fp32(key) else (dtype or t.dtype)
            t = t.to(device=device, dtype=target)
        else:
            t = t.to(device=device)
        state[key] = t
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)
