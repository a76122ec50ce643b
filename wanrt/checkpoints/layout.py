"""Detect which checkpoint layout a path is, from its files and keys (never from its name).

Layouts (docs/model-reference.md §10.1, §10.2):

- **official** (Wan-AI/Wan2.1-*): ``config.json`` (WanModel fields), ``diffusion_pytorch_model.safetensors``
  or shards + ``diffusion_pytorch_model.safetensors.index.json``, ``Wan2.1_VAE.pth`` (``Wan2.2_VAE.pth`` in TI2V-5B),
  ``models_t5_umt5-xxl-enc-bf16.pth`` and the tokenizer folder ``google/umt5-xxl/``; I2V/FLF2V add the
  CLIP ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (and ``xlm-roberta-large/``).
- **diffusers** (``*-Diffusers``): ``model_index.json`` with ``transformer/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/`` (and ``scheduler/``); I2V/FLF2V add ``image_encoder/`` (a transformers
  ``CLIPVisionModel``) and ``image_processor/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .io import check_folder_links, check_symlink_loop

OFFICIAL_DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"
OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_VAE22 = "Wan2.2_VAE.pth"  # the Wan2.2 TI2V-5B VAE; the folder's VAE when OFFICIAL_VAE is absent
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER = "google/umt5-xxl"
OFFICIAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


class LayoutError(ValueError):
    """A path is neither checkpoint layout, or a layout is missing a part."""


@dataclass(frozen=True)
class CheckpointLayout:
    """Where each part of a Wan2.1 checkpoint lives.

    Attributes:
        kind: "official" or "diffusers".
        root: the checkpoint folder.
        transformer: DiT folder (holding config.json and the weights).
        vae: VAE file (official ``Wan2.1_VAE.pth``, else ``Wan2.2_VAE.pth``) or diffusers ``vae/`` folder; None
            when absent.
        text_encoder: T5 ``.pth`` (official) or diffusers ``text_encoder/`` folder; None when absent.
        tokenizer: tokenizer folder; None when absent.
        image_encoder: CLIP image encoder of I2V/FLF2V checkpoints: the official
            ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` or the diffusers
            ``image_encoder/`` folder; None when absent (always, for text-to-video checkpoints).
    """

    kind: str
    root: Path
    transformer: Path
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Path | None
    image_encoder: Path | None = None


def read_json(path: Path) -> dict:
    """Read a JSON file; errors name the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path}: not valid JSON ({e})") from e


def dit_weights_file(folder: Path) -> Path:
    """The DiT weights entry point in ``folder``: the shard index if there is one, else the single file.

    Raises:
        LayoutError: neither exists; names the folder and the expected names.
        SymlinkLoopError: one of them is a symlink loop.
    """
    index = folder / (OFFICIAL_DIT_WEIGHTS + ".index.json")
    check_symlink_loop(index)
    check_symlink_loop(folder / OFFICIAL_DIT_WEIGHTS)
    if index.is_file():
        return index
    single = folder / OFFICIAL_DIT_WEIGHTS
    if single.is_file():
        return single
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return others[0]
    raise LayoutError(
        f"{folder}: no DiT weights (expected {OFFICIAL_DIT_WEIGHTS} or {OFFICIAL_DIT_WEIGHTS}.index.json)"
    )


def config_kind(cfg: dict) -> str | None:
    """'official' for a WanModel config.json, 'diffusers' for a WanTransformer3DModel one, else None."""
    if "num_attention_heads" in cfg and "attention_head_dim" in cfg:
        return "diffusers"
    if "dim" in cfg and "num_heads" in cfg and "num_layers" in cfg:
        return "official"
    return None


_OFFICIAL_FILES = (OFFICIAL_DIT_WEIGHTS, OFFICIAL_DIT_WEIGHTS + ".index.json", OFFICIAL_VAE, OFFICIAL_VAE22,
                   OFFICIAL_T5, OFFICIAL_CLIP)
_DIFFUSERS_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "image_encoder", "scheduler")
# every name detection and the loaders look up in a checkpoint folder (checked for symlink loops)
_LAYOUT_NAMES = ("model_index.json", "config.json", *_OFFICIAL_FILES, OFFICIAL_TOKENIZER, *_DIFFUSERS_PARTS,
                 "model.safetensors", "model.safetensors.index.json")


def _config_kind_of(path: Path) -> str | None:
    """:func:`config_kind` of a config file; None when it is absent or not readable JSON."""
    if not path.is_file():
        return None
    try:
        return config_kind(read_json(path))
    except (LayoutError, OSError, TypeError):
        return None


def _refuse_both_layouts(root: Path) -> None:
    """Refuse a folder holding the official layout and the diffusers one: which one loads must not be guessed.

    Official: a WanModel ``config.json`` or an official weights file at the top. Diffusers: ``model_index.json``
    or a ``transformer/`` folder with a WanTransformer3DModel config.

    Raises:
        LayoutError: both are present; names what was found of each and how to choose.
    """
    official = [n for n in _OFFICIAL_FILES if (root / n).is_file()]
    official_weights = list(official)
    if _config_kind_of(root / "config.json") == "official":
        official.insert(0, "config.json")
    if not official:
        return
    diffusers = ["model_index.json"] if (root / "model_index.json").is_file() else []
    if not diffusers and _config_kind_of(root / "transformer" / "config.json") != "diffusers":
        return
    subfolders = [n for n in _DIFFUSERS_PARTS if (root / n).is_dir()]
    diffusers += [n + "/" for n in subfolders]
    if (root / OFFICIAL_TOKENIZER).is_dir():
        official.append(OFFICIAL_TOKENIZER + "/")
    ways = ["move one layout to a folder of its own (an Engine loads a whole folder)"]
    parts = []
    if subfolders:
        parts.append(f"a diffusers subfolder such as {root / subfolders[0]}")
    if official_weights:
        parts.append(f"an official file such as {root / official_weights[0]}")
    if parts:
        ways.append("point a load_* function at one part: " + " or ".join(parts))
    raise LayoutError(
        f"{root} holds both checkpoint layouts: official ({', '.join(official)}) and diffusers "
        f"({', '.join(diffusers)}); wanrt will not guess which one to load. To choose, " + "; or ".join(ways)
    )


#: Wan2.2 A14B: the official subfolders of the two experts (``config.high_noise_checkpoint`` / ``low_noise_checkpoint``).
OFFICIAL_EXPERTS = ("high_noise_model", "low_noise_model")


def expert_folders(path: str | Path) -> tuple[Path, Path] | None:
    """The ``(high_noise, low_noise)`` expert folders of a Wan2.2 A14B checkpoint, or None for one DiT.

    Official layout: ``high_noise_model/`` and ``low_noise_model/`` (each a DiT folder: config.json and weights)
    beside ``Wan2.1_VAE.pth`` and the UMT5 files. diffusers: ``transformer/`` (high noise) and ``transformer_2/``
    (low noise, used below ``boundary_ratio * 1000``), ``model_index.json`` naming ``transformer_2``.

    Raises:
        LayoutError: one expert folder without the other.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    high, low = (root / n for n in OFFICIAL_EXPERTS)
    if high.is_dir() or low.is_dir():
        if not (high.is_dir() and low.is_dir()):
            have, miss = (high, low) if high.is_dir() else (low, high)
            raise LayoutError(f"{root}: {have.name}/ without {miss.name}/ (a Wan2.2 A14B checkpoint has both experts)")
        return high, low
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json")
        second = index.get("transformer_2")
        if isinstance(second, list) and second[0] is not None:  # diffusers writes [null, null] for an absent part
            if not (root / "transformer_2").is_dir():
                raise LayoutError(f"{root}: model_index.json names transformer_2 but there is no transformer_2/ folder")
            return root / "transformer", root / "transformer_2"
    return None


def detect_layout(path: str | Path) -> CheckpointLayout:
    """Detect the layout of a checkpoint folder.

    Args:
        path: an official checkpoint folder or a diffusers pipeline folder.

    Returns:
        The parts found; the optional ones (VAE, text encoder, tokenizer, image encoder) are None when
        absent. A bare diffusers ``transformer/`` folder gives only ``transformer``.

    Raises:
        FileNotFoundError: the path does not exist.
        LayoutError: the folder is neither layout (the message lists what was found), or it holds both
            (the message names the official files and the diffusers ``model_index.json``/subfolders found,
            and how to choose).
        SymlinkLoopError: the path, one of the layout's files or folders, or an entry of a part's folder is a
            symlink loop (a CheckpointError: "symlink loop at PATH").
    """
    root = Path(path).expanduser()
    check_symlink_loop(root)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {root}")
    if not root.is_dir():
        raise LayoutError(f"{root} is a file; a whole checkpoint is a folder (a single DiT file loads with load_transformer)")
    for name in _LAYOUT_NAMES:
        check_symlink_loop(root / name)
    for name in _DIFFUSERS_PARTS + (OFFICIAL_TOKENIZER,):
        if (root / name).is_dir():
            check_folder_links(root / name)
    _refuse_both_layouts(root)
    if (root / "model_index.json").is_file():
        read_json(root / "model_index.json")

        def part(name: str) -> Path | None:
            p = root / name
            return p if p.is_dir() else None

        if part("transformer") is None:
            raise LayoutError(f"{root}: diffusers layout (model_index.json) without a transformer/ folder")
        return CheckpointLayout(
            "diffusers", root, root / "transformer", part("vae"), part("text_encoder"), part("tokenizer"),
            part("image_encoder"),
        )
    cfg_path = root / "config.json"
    experts = expert_folders(root) if not cfg_path.is_file() else None
    if experts is not None:  # official Wan2.2 A14B: the experts' folders, the other parts at the top

        def top(name: str) -> Path | None:
            p = root / name
            return p if p.exists() else None

        return CheckpointLayout("official", root, experts[0], top(OFFICIAL_VAE) or top(OFFICIAL_VAE22), top(OFFICIAL_T5),
                                top(OFFICIAL_TOKENIZER), top(OFFICIAL_CLIP))
    if cfg_path.is_file():
        kind = config_kind(read_json(cfg_path))
        if kind == "official":

            def file(name: str) -> Path | None:
                p = root / name
                return p if p.exists() else None

            return CheckpointLayout(
                "official", root, root, file(OFFICIAL_VAE) or file(OFFICIAL_VAE22), file(OFFICIAL_T5),
                file(OFFICIAL_TOKENIZER),
                file(OFFICIAL_CLIP),
            )
        if kind == "diffusers":
            # a bare diffusers transformer/ folder
            return CheckpointLayout("diffusers", root, root, None, None, None)
    found = sorted(p.name for p in root.iterdir())[:12]
    raise LayoutError(
        f"{root} is neither an official Wan2.1 checkpoint (config.json with WanModel fields + "
        f"{OFFICIAL_DIT_WEIGHTS}) nor a diffusers one (model_index.json); found: {found}"
    )
