"""Loading checks: bad input gets a clear error (naming the file and the key) and loses nothing.

- a folder holding both the official and the diffusers layout is refused, never silently resolved;
- an integer tensor where a floating-point weight belongs is refused (8-bit quantized weights with their
  scales excepted);
- a shard index may only name files inside its folder;
- a symlink loop is reported as "symlink loop at PATH", not as a missing file or a degraded tokenizer.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import wanrt
from wanrt.checkpoints.io import CheckpointError, SymlinkLoopError
from wanrt.checkpoints.layout import LayoutError, detect_layout
from wanrt.checkpoints.tiny import write_checkpoint

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a link's target, a file's sha256, or "dir" (links are not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture()
def both(tiny_official, tiny_diffusers, tmp_path):
    """An official checkpoint with a diffusers pipeline copied over it (same folder)."""
    root = tmp_path / "both"
    shutil.copytree(tiny_official, root)
    for p in tiny_diffusers.iterdir():
        if p.is_dir():
            shutil.copytree(p, root / p.name)
        else:
            shutil.copy(p, root / p.name)
    return root


# ------------------------------------------------------------------------------ both layouts in one folder


def test_both_layouts_in_one_folder_are_refused_naming_both(both):
    before = _snapshot(both)
    with pytest.raises(LayoutError) as e:
        detect_layout(both)
    msg = str(e.value)
    assert f"{both} holds both checkpoint layouts" in msg
    official = re.search(r"official \(([^)]*)\)", msg).group(1)
    diffusers = re.search(r"diffusers \(([^)]*)\)", msg).group(1)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth",
                 "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/"):
        assert name in official, (name, msg)
    for name in ("model_index.json", "transformer/", "vae/", "text_encoder/", "tokenizer/"):
        assert name in diffusers, (name, msg)
    # how to choose: move one away, or point at a subfolder / a single file
    assert "move one layout to a folder of its own" in msg
    assert str(both / "transformer") in msg and str(both / "diffusion_pytorch_model.safetensors") in msg

    loaders = (wanrt.load_transformer, wanrt.load_vae, wanrt.load_text_encoder, wanrt.load_image_encoder)
    for loader in loaders:
        with pytest.raises(LayoutError, match="holds both checkpoint layouts"):
            loader(both, device="cpu")
    with pytest.raises(LayoutError, match="holds both checkpoint layouts"):
        wanrt.Engine("tiny", both, device="cpu")
    with pytest.raises(LayoutError, match="holds both checkpoint layouts"):
        wanrt.Engine.from_pretrained(both, device="cpu")
    assert _snapshot(both) == before  # nothing moved, nothing written

    # the advice works: each part loads when pointed at
    assert isinstance(wanrt.load_transformer(both / "transformer", device="cpu", dtype=torch.float32),
                      torch.nn.Module)
    assert isinstance(wanrt.load_transformer(both / "diffusion_pytorch_model.safetensors", device="cpu",
                                             dtype=torch.float32), torch.nn.Module)
    wanrt.load_vae(both / "Wan2.1_VAE.pth", device="cpu")
    wanrt.load_vae(both / "vae", device="cpu")


def test_official_folder_with_a_diffusers_transformer_or_file_is_refused(tiny_official, tiny_diffusers, tmp_path):
    # no model_index.json, but a diffusers transformer/ beside the official files
    a = tmp_path / "a"
    shutil.copytree(tiny_official, a)
    shutil.copytree(tiny_diffusers / "transformer", a / "transformer")
    with pytest.raises(LayoutError, match=r"official \(config\.json, .*\) and diffusers \(transformer/\)"):
        wanrt.load_transformer(a, device="cpu")
    # a diffusers pipeline with an official VAE file dropped at the top
    b = tmp_path / "b"
    shutil.copytree(tiny_diffusers, b)
    shutil.copy(tiny_official / "Wan2.1_VAE.pth", b / "Wan2.1_VAE.pth")
    with pytest.raises(LayoutError, match=r"official \(Wan2\.1_VAE\.pth\) and diffusers \(model_index\.json, "):
        wanrt.load_vae(b, device="cpu")
    # each layout alone is still detected
    assert detect_layout(tiny_official).kind == "official" and detect_layout(tiny_diffusers).kind == "diffusers"


# ------------------------------------------------------------------------------ integer tensors


def _to_int(f: Path, key: str, dtype=torch.int32) -> None:
    if f.suffix == ".safetensors":
        sd = load_file(str(f))
        sd[key] = sd[key].to(dtype)
        save_file(sd, str(f))
    else:
        sd = torch.load(str(f), weights_only=True)
        sd[key] = sd[key].to(dtype)
        torch.save(sd, str(f))


@pytest.mark.parametrize("part, rel, key, dtype", [
    ("dit", "diffusion_pytorch_model.safetensors", "blocks.0.ffn.0.weight", torch.int32),
    ("dit", "diffusion_pytorch_model.safetensors", "head.modulation", torch.int64),
    ("vae", "Wan2.1_VAE.pth", "encoder.conv1.weight", torch.int64),
    ("t5", "models_t5_umt5-xxl-enc-bf16.pth", "token_embedding.weight", torch.int32),
])
def test_integer_tensor_in_official_files_is_named(tiny_official, tmp_path, part, rel, key, dtype):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_official, root)
    _to_int(root / rel, key, dtype)
    before = _snapshot(root)
    loader = {"dit": wanrt.load_transformer, "vae": wanrt.load_vae, "t5": wanrt.load_text_encoder}[part]
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=f"stored as {name}, an integer dtype") as e:
        loader(root, device="cpu")
    assert e.value.file == str(root / rel) and e.value.key == key
    assert f"file {root / rel}" in str(e.value) and f"key {key!r}" in str(e.value)
    assert _snapshot(root) == before


def test_integer_tensor_in_diffusers_shard_named_as_spelled(tiny_diffusers, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_diffusers, root)
    index = json.loads((root / "transformer" / INDEX).read_text())
    key = "blocks.0.attn1.to_q.weight"  # the diffusers spelling of blocks.0.self_attn.q.weight
    shard = root / "transformer" / index["weight_map"][key]
    _to_int(shard, key, torch.int16)
    with pytest.raises(CheckpointError, match="DiT: tensor stored as int16") as e:
        wanrt.load_transformer(root, device="cpu")
    assert e.value.file == str(shard) and e.value.key == key


def test_integer_tensor_in_clip_files_is_named(tiny_i2v_official, tiny_i2v_diffusers, tmp_path):
    off = tmp_path / "clip.pth"
    shutil.copy(tiny_i2v_official / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", off)
    _to_int(off, "visual.transformer.0.mlp.0.weight")
    with pytest.raises(CheckpointError, match="image encoder: tensor stored as int32") as e:
        wanrt.load_image_encoder(off, device="cpu")
    assert e.value.file == str(off) and e.value.key == "visual.transformer.0.mlp.0.weight"
    # transformers layout: q/k/v are fused into one tensor; the integer part is named as the file spells it
    enc = tmp_path / "image_encoder"
    shutil.copytree(tiny_i2v_diffusers / "image_encoder", enc)
    key = next(k for k in load_file(str(enc / "model.safetensors")) if k.endswith("layers.0.self_attn.v_proj.weight"))
    _to_int(enc / "model.safetensors", key)
    with pytest.raises(CheckpointError, match="image encoder: tensor stored as int32") as e:
        wanrt.load_image_encoder(enc, device="cpu")
    assert e.value.file == str(enc / "model.safetensors") and e.value.key == key


def test_int8_weights_load_only_with_their_scales(tiny_official, tmp_path):
    """8-bit weights with a per-channel scale are a quantized checkpoint; without the scale they are refused."""
    from wanrt.quant import DIT_QUANT_PATTERN, quantize_rowwise

    state = load_file(str(tiny_official / "diffusion_pytorch_model.safetensors"))
    scaled = dict(state)
    for k in list(state):
        if k.endswith(".weight") and DIT_QUANT_PATTERN.match(k[: -len(".weight")]):
            scaled[k], scaled[k[: -len(".weight")] + ".weight_scale"] = quantize_rowwise(state[k].float(), torch.int8)
    cfg = (tiny_official / "config.json").read_text()
    ok = tmp_path / "int8.safetensors"
    save_file(scaled, str(ok), metadata={"config": cfg})
    m = wanrt.load_transformer(ok, device="cpu")
    assert m.blocks[0].self_attn.q.weight.dtype == torch.int8
    key = "blocks.0.self_attn.q.weight"
    del scaled[key[: -len(".weight")] + ".weight_scale"]
    bad = tmp_path / "int8-no-scale.safetensors"
    save_file(scaled, str(bad), metadata={"config": cfg})
    with pytest.raises(CheckpointError, match=r"stored as int8, an integer dtype.*weight_scale") as e:
        wanrt.load_transformer(bad, device="cpu")
    assert e.value.file == str(bad) and e.value.key == key


# ------------------------------------------------------------------------------ shard index entries


@pytest.fixture()
def transformer(tiny_diffusers, tmp_path):
    """A copy of the tiny diffusers transformer/ folder (2 shards + index), and its index."""
    dst = tmp_path / "pipe" / "transformer"
    shutil.copytree(tiny_diffusers / "transformer", dst)
    return dst, json.loads((dst / INDEX).read_text())


def _rewrite(folder: Path, index: dict, key: str, shard: str) -> None:
    """Point every entry of ``key``'s shard at ``shard`` instead."""
    old = index["weight_map"][key]
    index["weight_map"] = {k: (shard if v == old else v) for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


def test_shard_index_entries_must_stay_inside_the_folder(transformer, tmp_path):
    folder, index = transformer
    first_key = next(iter(index["weight_map"]))
    shard = index["weight_map"][first_key]
    outside = folder.parent / shard
    shutil.move(folder / shard, outside)  # the real shard now lives one level up
    cases = {
        f"../{shard}": "climbs out with '..'",
        str(outside): "is an absolute path",
        f"sub/../../{shard}": "climbs out with '..'",
        f"..\\{shard}": "climbs out with '..'",
        f"C:\\models\\{shard}": "is an absolute path",
    }
    for entry, why in cases.items():
        _rewrite(folder, json.loads(json.dumps(index)), first_key, entry)
        with pytest.raises(CheckpointError, match=re.escape(f"-> {entry!r} {why}")) as e:
            wanrt.load_transformer(folder, device="cpu")
        assert e.value.file == str(folder / INDEX) and e.value.key == first_key, entry
        assert f"shard index entry {first_key!r}" in str(e.value)
    # a symbolic link in the folder that leads out
    _rewrite(folder, json.loads(json.dumps(index)), first_key, shard)
    os.symlink(outside, folder / shard)
    with pytest.raises(CheckpointError, match=r"is a symbolic link to .*, outside the folder") as e:
        wanrt.load_transformer(folder, device="cpu")
    assert e.value.file == str(folder / INDEX) and e.value.key == first_key
    assert outside.is_file()  # nothing lost


def test_shard_links_inside_the_folder_and_the_hub_cache_still_load(transformer, tmp_path):
    folder, index = transformer
    ref = wanrt.load_transformer(folder, device="cpu", dtype=torch.float32)
    # a link to a file of the same folder
    shard = min(index["weight_map"].values())
    (folder / shard).rename(folder / "real.safetensors")
    os.symlink("real.safetensors", folder / shard)
    wanrt.load_transformer(folder, device="cpu", dtype=torch.float32)
    # the Hugging Face cache: snapshots/<rev>/transformer/* are links into blobs/ (the index too)
    blobs = tmp_path / "hub" / "blobs"
    snap = tmp_path / "hub" / "snapshots" / "abc123" / "transformer"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, p in enumerate(sorted(folder.iterdir())):
        real = p.resolve()
        shutil.copy(real, blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", snap), snap / p.name)
    m = wanrt.load_transformer(snap, device="cpu", dtype=torch.float32)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k


def test_malformed_shard_entries_are_named(transformer):
    folder, index = transformer
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = 7
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"entry .*: 7 is not a file name") as e:
        wanrt.load_transformer(folder, device="cpu")
    assert e.value.file == str(folder / INDEX) and e.value.key == key
    (folder / INDEX).write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    with pytest.raises(CheckpointError, match="'weight_map' must map tensor keys to shard file names") as e:
        wanrt.load_transformer(folder, device="cpu")
    assert e.value.file == str(folder / INDEX)


# ------------------------------------------------------------------------------ symlink loops


def _loop(p: Path) -> Path:
    """Replace ``p`` (file or folder) by a link to itself."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
    os.symlink(p.name, p)
    return p


def _assert_loop(exc_info, at: Path) -> None:
    assert isinstance(exc_info.value, SymlinkLoopError) and isinstance(exc_info.value, CheckpointError)
    assert str(exc_info.value).startswith(f"symlink loop at {at} ")
    assert exc_info.value.file == str(at)


def test_looping_checkpoint_folder_and_single_file(tmp_path):
    loop = _loop(tmp_path / "ckpt")
    for call in (lambda: wanrt.load_transformer(loop, device="cpu"), lambda: wanrt.load_vae(loop, device="cpu"),
                 lambda: wanrt.Engine("tiny", loop, device="cpu"), lambda: detect_layout(loop)):
        with pytest.raises(CheckpointError, match="symlink loop at") as e:
            call()
        _assert_loop(e, loop)
    # a path through the loop names the looping component
    with pytest.raises(CheckpointError) as e:
        wanrt.load_transformer(loop / "transformer" / "x.safetensors", device="cpu")
    _assert_loop(e, loop)
    f = _loop(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        wanrt.load_transformer(f, device="cpu")
    _assert_loop(e, f)
    # a two-link loop
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(CheckpointError) as e:
        wanrt.load_vae(tmp_path / "a", device="cpu")
    _assert_loop(e, tmp_path / "a")


@pytest.mark.parametrize("rel", ["Wan2.1_VAE.pth", "diffusion_pytorch_model.safetensors", "config.json",
                                 "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl", "google"])
def test_looping_part_of_an_official_checkpoint(tiny_official, tmp_path, rel):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_official, root)
    at = _loop(root / rel)
    loader = (wanrt.load_vae if "VAE" in rel else wanrt.load_transformer if rel.endswith(("safetensors", ".json"))
              else wanrt.load_text_encoder)
    with pytest.raises(CheckpointError) as e:
        loader(root, device="cpu")
    _assert_loop(e, at)


@pytest.mark.parametrize("name", ["tokenizer.json", "spiece.model", "tokenizer_config.json"])
def test_looping_tokenizer_file_is_named_not_skipped(tiny_official, tmp_path, name):
    """transformers skips an unreadable tokenizer file and builds a degraded tokenizer (or asks to install
    sentencepiece); the loop is named instead."""
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_official, root)
    at = _loop(root / "google" / "umt5-xxl" / name)
    with pytest.raises(CheckpointError) as e:
        wanrt.load_text_encoder(root, device="cpu")
    _assert_loop(e, at)
    with pytest.raises(CheckpointError) as e:  # the .pth file with its tokenizer beside it
        wanrt.load_text_encoder(root / "models_t5_umt5-xxl-enc-bf16.pth", device="cpu")
    _assert_loop(e, at)


@pytest.mark.parametrize("rel", ["vae", "transformer/config.json", "text_encoder/model.safetensors",
                                 "tokenizer/tokenizer.json", "transformer/" + INDEX])
def test_looping_part_of_a_diffusers_checkpoint(tiny_diffusers, tmp_path, rel):
    root = tmp_path / "d"
    shutil.copytree(tiny_diffusers, root)
    at = _loop(root / rel)
    loader = {"vae": wanrt.load_vae, "transformer": wanrt.load_transformer}.get(rel.split("/")[0],
                                                                                 wanrt.load_text_encoder)
    with pytest.raises(CheckpointError) as e:
        loader(root, device="cpu")
    _assert_loop(e, at)


def test_looping_shard_named_by_the_index(transformer):
    folder, index = transformer
    shard = sorted(set(index["weight_map"].values()))[1]
    at = _loop(folder / shard)
    with pytest.raises(CheckpointError) as e:
        wanrt.load_transformer(folder, device="cpu")
    _assert_loop(e, at)


def test_writer_checkpoints_pass_every_check(tmp_path):
    """The tiny writer's own layouts (sharded, both kinds) load with all the checks on."""
    for layout in ("official", "diffusers"):
        root = write_checkpoint(tmp_path / layout, layout=layout, preset="tiny", shards=2)
        assert detect_layout(root).kind == layout
        wanrt.load_transformer(root, device="cpu")
        wanrt.load_vae(root, device="cpu")
        wanrt.load_text_encoder(root, device="cpu")


# ------------------------------------------------------------------------------ the file and the key, always


def test_architecture_inference_errors_name_the_file_and_the_key(tiny_official, tmp_path):
    """A lone DiT file carries no config: a missing key the inference needs, or a bad ``config`` metadata entry,
    is reported with the file (and the key)."""
    state = load_file(str(tiny_official / "diffusion_pytorch_model.safetensors"))
    del state["patch_embedding.weight"]
    lone = tmp_path / "lone.safetensors"
    save_file(state, str(lone))
    with pytest.raises(CheckpointError, match="cannot infer the DiT architecture") as e:
        wanrt.load_transformer(lone, device="cpu")
    assert e.value.file == str(lone) and e.value.key == "patch_embedding.weight"
    bad = tmp_path / "bad-metadata.safetensors"
    save_file(load_file(str(tiny_official / "diffusion_pytorch_model.safetensors")), str(bad),
              metadata={"config": "{not json"})
    with pytest.raises(CheckpointError, match="'config' metadata is not JSON") as e:
        wanrt.load_transformer(bad, device="cpu")
    assert e.value.file == str(bad)
