"""Train the project's tiny Wan2.1 model on procedural clips (:mod:`wanrt.demo.data`), on a CPU, in plain PyTorch.

Three stages, in this order, into one folder (``python -m wanrt.demo.train OUT``):

1. **text**: a SentencePiece tokenizer trained on the captions' vocabulary and the tiny UMT5 encoder with seeded
   random weights, frozen (the DiT learns to read its features). Written at once in the official layout.
2. **vae**: the real :class:`~wanrt.models.vae.WanVAE` at base dim 8 (16 latent channels, 4×8×8 compression) trained
   for reconstruction of 5-frame, then 9-frame clips (MSE on pixels in [-1, 1], the objects' pixels weighted ``1 + vae_fg_weight``:
   they are a small part of each frame) with a very small KL term towards the official latent normalisation,
   N(mean, std²) per channel. The decoder is trained on sampled latents. Afterwards the latents are re-standardised
   exactly (:func:`standardize_latents_`), so the normalised latents the DiT sees have unit variance.
3. **dit**: the real :class:`~wanrt.models.dit.WanDiT` at the ``tiny`` preset's size trained with the rectified-flow
   objective of Wan2.1 (``x_t = (1 - σ) x_0 + σ ε``, target ``ε - x_0``, ``t = 1000 σ``) on the frozen VAE's
   normalised latents of a fixed set of clips (encoded once), conditioned on the frozen text features; the caption is
   replaced by the default negative prompt or "" 10% of the time, so classifier-free guidance has an unconditional
   branch to push away from. An exponential moving average of the weights is what ships.

Determinism: every batch (clips, noise, σ, caption dropout) is drawn from generators seeded by ``(seed, stage,
step)``, so a run resumed from its last state file (``--resume``; written every ``--save-every`` steps and at the
end of each stage) takes exactly the steps an uninterrupted run takes. Threads default to 2 (this project's CI
machine). A loss log (``train_log.jsonl``: stage, step, loss, seconds) is appended as the run goes, and a tqdm bar
shows progress.

The output folder is an official-layout checkpoint (``config.json``, ``diffusion_pytorch_model.safetensors``,
``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/``) that ``wanrt.Engine("tiny", OUT)``
loads; :func:`export` copies the weights without the training state into the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import make_clip

#: Clip shapes of each stage: the VAE sees 5-frame 64x64 clips (frame 0 alone, then one causal chunk of 4; cheap)
#: for its first ``vae_short_steps`` steps, then 9-frame ones (a chunk after a chunk reads the cache differently
#: from the first: the VAE must see it); convolutions do not care about the width. The DiT trains on the shapes
#: of :data:`DIT_SHAPES`.
VAE_SHAPES = ((64, 64, 5),)
VAE_LONG_SHAPES = ((64, 64, 9),)
#: The DiT's clip shapes (height, width, frames): the demo's 64x96x9 and the gate's 64x64x9, and 17 frames so
#: longer clips are not out of distribution.
DIT_SHAPES = ((64, 64, 9), (64, 96, 9), (64, 64, 17))
STATE_FILE = {"vae": "train_state_vae.pt", "dit": "train_state_dit.pt"}


@dataclass
class TrainConfig:
    """What a run does; every field has a command-line flag of the same name."""

    seed: int = 0
    threads: int = 2
    vae_steps: int = 2500
    vae_short_steps: int = 1000
    vae_batch: int = 4
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    vae_fg_weight: float = 8.0
    dit_steps: int = 16000
    dit_fg_weight: float = 4.0
    dit_text_len: int = 128
    dit_batch: int = 24
    dit_lr: float = 5e-4
    dit_clips: int = 6144
    ema: float = 0.999
    uncond_prob: float = 0.1
    shift: float = 3.0
    save_every: int = 250
    standardize_clips: int = 256


def _gen(cfg: TrainConfig, stage: str, step: int) -> torch.Generator:
    """The generator of one step of one stage (the same on a resumed run)."""
    stage_id = {"vae": 1, "dit": 2, "data": 3}[stage]
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + stage_id) * 10_000_019 + step)


def _lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _clips_tensor(seeds, shape) -> tuple[torch.Tensor, list[str]]:
    """Clips ``seeds`` at ``(H, W, F)`` as ``[B, 3, F, H, W]`` float32 in [-1, 1], and their captions."""
    h, w, f = shape
    frames, captions = [], []
    for s in seeds:
        clip, caption, _ = make_clip(int(s), h, w, f)
        frames.append(clip)
        captions.append(caption)
    x = torch.from_numpy(np.stack(frames)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return x, captions


def _log(out: Path, record: dict) -> None:
    with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _save_state(out: Path, stage: str, state: dict) -> None:
    tmp = out / (STATE_FILE[stage] + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / STATE_FILE[stage])


def _load_state(out: Path, stage: str) -> dict | None:
    path = out / STATE_FILE[stage]
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------- text


def caption_corpus(n: int = 4000) -> tuple[str, ...]:
    """Captions of the training clips ``0 .. n-1`` (the tokenizer's extra corpus)."""
    return tuple(make_clip(s, 64, 64, 1)[1] for s in range(n))


def write_text(out: Path, cfg: TrainConfig) -> None:
    """Stage 1: the tokenizer and the frozen random UMT5 (official file names), skipped when present."""
    from ..checkpoints.layout import OFFICIAL_T5, OFFICIAL_TOKENIZER
    from ..checkpoints.tiny import TINY_VOCAB, randomize_, tiny_t5_config
    from ..checkpoints.tiny_tokenizer import build_tiny_tokenizer
    from ..models.t5 import UMT5Encoder
    from ..presets import get_preset

    if (out / OFFICIAL_T5).is_file() and (out / OFFICIAL_TOKENIZER / "tokenizer_config.json").is_file():
        return
    t5_cfg = tiny_t5_config(get_preset("tiny").arch.text_dim, TINY_VOCAB)
    build_tiny_tokenizer(out / OFFICIAL_TOKENIZER, vocab_size=t5_cfg.vocab_size, extra_corpus=caption_corpus())
    t5 = randomize_(UMT5Encoder(t5_cfg), cfg.seed + 2).to(torch.bfloat16)
    torch.save(t5.state_dict(), out / OFFICIAL_T5)


# ----------------------------------------------------------------------------------------------------------- vae


def foreground(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, F, H, W]`` 1.0 where a clip ``x [B, 3, F, H, W]`` (in [-1, 1]) differs from its row's median colour
    by more than 0.25 in some channel (the objects: backgrounds are plain or vertical gradients), else 0.0. The
    objects are a small part of each frame, so the VAE's reconstruction loss weighs these pixels up."""
    b, c, f, h, w = x.shape
    bg = x.permute(0, 1, 3, 2, 4).reshape(b, c, h, f * w).median(dim=-1).values  # [B, 3, H]
    return ((x - bg[:, :, None, :, None]).abs().amax(dim=1, keepdim=True) > 0.25).float()


def vae_forward(vae, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable encode → sample → decode of ``x [B, 3, F, H, W]`` through the causal chunking of
    :meth:`WanVAE.encode` / :meth:`WanVAE.decode`. Returns ``(reconstruction [B, 3, F, H, W], kl)``, the KL of the
    posterior from N(mean, std²) (the official latent normalisation) per latent element."""
    cache = vae.new_encoder_cache()
    feats = [vae.encoder(x[:, :, :1], cache)]
    for start in range(1, x.shape[2], 4):
        feats.append(vae.encoder(x[:, :, start:start + 4], cache))
    mu, logvar = vae.conv1(torch.cat(feats, dim=2)).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z_norm = vae.normalize_latents(mu)  # (mu - mean) / std
    mean, inv_std = vae._latent_stats(mu.device)
    var_norm = logvar.exp() * inv_std**2
    kl = 0.5 * (z_norm**2 + var_norm - 1 - var_norm.log()).mean()
    eps = torch.randn(mu.shape, generator=gen)
    z = mu + (0.5 * logvar).exp() * eps
    h = vae.conv2(z)
    dcache = vae.new_decoder_cache()
    frames = [vae.decoder(h[:, :, i:i + 1], dcache) for i in range(h.shape[2])]
    return torch.cat(frames, dim=2), kl


def train_vae(out: Path, cfg: TrainConfig):
    """Stage 2 (resumable). Returns the trained VAE (eval mode, frozen)."""
    from tqdm import tqdm

    from ..checkpoints.layout import OFFICIAL_VAE
    from ..checkpoints.tiny import randomize_, tiny_vae_config
    from ..models.vae import WanVAE
    from ..presets import get_preset

    vae = WanVAE(tiny_vae_config(get_preset("tiny")))
    if (out / OFFICIAL_VAE).is_file() and not (out / STATE_FILE["vae"]).is_file():
        vae.load_state_dict(torch.load(out / OFFICIAL_VAE, map_location="cpu", weights_only=True))
        return vae.eval().requires_grad_(False)
    randomize_(vae, cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    state = _load_state(out, "vae")
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    vae.train()
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="vae", mininterval=5)
    t0 = time.time()
    for step in bar:
        g = _gen(cfg, "vae", step)
        shapes = VAE_SHAPES if step < cfg.vae_short_steps else VAE_LONG_SHAPES
        shape = shapes[int(torch.randint(len(shapes), (1,), generator=g))]
        seeds = torch.randint(0, 10**7, (cfg.vae_batch,), generator=g).tolist()
        x, _ = _clips_tensor(seeds, shape)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr)
        recon, kl = vae_forward(vae, x, g)
        err = (recon - x) ** 2
        mse = err.mean()
        weight = 1.0 + cfg.vae_fg_weight * foreground(x)  # [B, 1, F, H, W]
        loss = (err * weight).mean() / weight.mean() + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == cfg.vae_steps - 1:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}", psnr=f"{psnr:.1f}")
            _log(out, {"stage": "vae", "step": step, "mse": mse.item(), "kl": kl.item(), "psnr": psnr,
                       "seconds": round(time.time() - t0, 1)})
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.vae_steps:
            _save_state(out, "vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    vae.eval().requires_grad_(False)
    standardize_latents_(vae, cfg, cfg.standardize_clips)
    torch.save(vae.state_dict(), out / OFFICIAL_VAE)
    (out / STATE_FILE["vae"]).unlink(missing_ok=True)
    return vae


@torch.no_grad()
def standardize_latents_(vae, cfg: TrainConfig, clips: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-parameterise a trained VAE so that its normalised latents have zero mean and unit variance per channel
    over the data (the official normalisation constants are fixed, a trained posterior's scale is not).

    ``mu' = a mu + b`` per channel is folded into the rows of ``conv1`` (and ``log σ² += 2 log a``), and its
    inverse into the input columns of ``conv2``, so reconstructions are unchanged up to rounding. Returns the
    measured per-channel mean and std before the change."""
    g = _gen(cfg, "data", 1)
    seeds = torch.randint(0, 10**7, (clips,), generator=g).tolist()
    lat = torch.cat([vae.encode(_clips_tensor(seeds[i:i + 32], DIT_SHAPES[(i // 32) % 2])[0])
                     .transpose(0, 1).reshape(vae.config.z_dim, -1) for i in range(0, clips, 32)], dim=1)
    m, s = lat.mean(1), lat.std(1).clamp_min(1e-3)
    mean, inv_std = (t.view(-1) for t in vae._latent_stats(torch.device("cpu")))
    big_m, big_s = mean, 1.0 / inv_std
    a = 1.0 / s
    b = big_m - (big_m + big_s * m) / s
    z = vae.config.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias  # [2z, 2z, 1, 1, 1]
    w1[:z] *= a.view(-1, 1, 1, 1, 1)
    b1[:z] = a * b1[:z] + b
    b1[z:] += 2 * torch.log(a)
    w2, b2 = vae.conv2.weight, vae.conv2.bias  # [z, z, 1, 1, 1]: input columns see mu'
    b2 -= (w2[:, :, 0, 0, 0] * (b / a).view(1, -1)).sum(1)
    w2 /= a.view(1, -1, 1, 1, 1)
    return m, s


# ----------------------------------------------------------------------------------------------------------- dit


def encode_dataset(out: Path, cfg: TrainConfig, vae, text) -> dict:
    """The DiT's data: ``cfg.dit_clips`` clips (seeds from the data generator, shapes cycling through
    :data:`DIT_SHAPES`) encoded once by the frozen VAE (posterior mean, normalised) and their captions' text
    features. Cached in ``dit_data.pt``."""
    from tqdm import tqdm

    path = out / "dit_data.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    g = _gen(cfg, "data", 0)
    seeds = torch.randint(0, 10**7, (cfg.dit_clips,), generator=g).tolist()
    groups: dict[tuple, list] = {s: [] for s in DIT_SHAPES}
    for k, s in enumerate(seeds):
        groups[DIT_SHAPES[k % len(DIT_SHAPES)]].append(s)
    data = {"latents": {}, "masks": {}, "captions": {}}
    with torch.no_grad():
        for shape, group in groups.items():
            lat, masks, caps = [], [], []
            for i in tqdm(range(0, len(group), 32), desc=f"encode {shape}", mininterval=5):
                x, c = _clips_tensor(group[i:i + 32], shape)
                lat.append(vae.encode(x))
                masks.append(latent_foreground(x).to(torch.bool))
                caps.extend(c)
            data["latents"][shape] = torch.cat(lat)
            data["masks"][shape] = torch.cat(masks)
            data["captions"][shape] = caps
    prompts = sorted({c for caps in data["captions"].values() for c in caps})
    feats = {}
    with torch.no_grad():
        for i in range(0, len(prompts), 256):
            for p, f in zip(prompts[i:i + 256], text.encode(prompts[i:i + 256]), strict=True):
                feats[p] = f.float().clone()  # not a view of the batch's padded storage
    from ..presets import get_preset

    for p in (get_preset("tiny").negative_prompt, ""):
        feats[p] = text.encode([p])[0].float().clone()
    data["text"] = feats
    torch.save(data, path)
    return data


def latent_foreground(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, H/8, W/8]`` 1.0 at the latent positions whose pixels hold some object (:func:`foreground`) for a
    clip ``x [B, 3, F, H, W]``, ``F = 4T - 3``: latent frame 0 covers frame 0, latent frame ``t`` frames ``4t - 3 ..
    4t`` (the VAE's causal chunks), each latent pixel an 8x8 block."""
    fg = foreground(x)
    first = F.max_pool3d(fg[:, :, :1], (1, 8, 8))
    if fg.shape[2] == 1:
        return first
    return torch.cat([first, F.max_pool3d(fg[:, :, 1:], (4, 8, 8))], dim=2)


def _context(feats: list[torch.Tensor]) -> torch.Tensor:
    """Text features ``[L_i, D]`` zero-padded to the longest: ``[B, L, D]`` (the DiT pads the rest)."""
    n = max(f.shape[0] for f in feats)
    out = torch.zeros(len(feats), n, feats[0].shape[1])
    for i, f in enumerate(feats):
        out[i, :f.shape[0]] = f
    return out


def train_dit(out: Path, cfg: TrainConfig, data: dict):
    """Stage 3 (resumable). Returns the EMA DiT."""
    import copy

    from tqdm import tqdm

    from ..checkpoints.tiny import dit_config_for, randomize_
    from ..models.dit import WanDiT
    from ..presets import get_preset

    preset = get_preset("tiny")
    # text_len 128 (the official 512 zero-pads every prompt; the default negative prompt is 114 tokens here): the
    # cross-attention keys cost a quarter, the checkpoint's config.json says 128 and the Engine pads to it.
    dit = WanDiT(dataclasses.replace(dit_config_for(preset), text_len=cfg.dit_text_len))
    randomize_(dit, cfg.seed + 4)
    with torch.no_grad():  # the usual DiT start: the head predicts zero, blocks start as near-identities
        dit.head.head.weight.zero_()
        dit.head.head.bias.zero_()
    ema = copy.deepcopy(dit).requires_grad_(False)
    decay, no_decay = [], []
    for name, p in dit.named_parameters():
        (decay if p.ndim >= 2 and "modulation" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.dit_lr, betas=(0.9, 0.99))
    start = 0
    state = _load_state(out, "dit")
    if state is not None:
        dit.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    dit.train()
    shapes = list(data["latents"])
    uncond = [preset.negative_prompt, ""]
    bar = tqdm(range(start, cfg.dit_steps), initial=start, total=cfg.dit_steps, desc="dit", mininterval=5)
    t0, running = time.time(), None
    for step in bar:
        g = _gen(cfg, "dit", step)
        shape = shapes[int(torch.randint(len(shapes), (1,), generator=g))]
        pool = data["latents"][shape]
        idx = torch.randint(len(pool), (cfg.dit_batch,), generator=g)
        x0 = pool[idx]
        weight = 1.0 + cfg.dit_fg_weight * data["masks"][shape][idx].float()  # [B, 1, T, h, w]
        drop = torch.rand(cfg.dit_batch, generator=g) < cfg.uncond_prob
        which = torch.randint(2, (cfg.dit_batch,), generator=g)
        caps = [uncond[int(which[i])] if drop[i] else data["captions"][shape][int(j)] for i, j in enumerate(idx)]
        ctx = _context([data["text"][c] for c in caps])
        u = torch.rand(cfg.dit_batch, generator=g)
        sigma = cfg.shift * u / (1 + (cfg.shift - 1) * u)  # the shifted σ of the sampler's schedule
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.dit_steps, cfg.dit_lr)
        v = dit(xt, sigma * 1000, ctx)
        loss = (weight * (v - (noise - x0)) ** 2).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), dit.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == cfg.dit_steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
            _log(out, {"stage": "dit", "step": step, "loss": loss.item(), "smoothed": running,
                       "seconds": round(time.time() - t0, 1)})
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.dit_steps:
            _save_state(out, "dit", {"model": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                     "step": step + 1})
    return ema.eval()


def write_dit(out: Path, dit) -> None:
    """The DiT in the official layout: ``config.json`` and ``diffusion_pytorch_model.safetensors``."""
    from ..checkpoints.tiny import write_official_dit

    write_official_dit(out, dit)


def train(out: str | Path, cfg: TrainConfig | None = None, *, resume: bool = False) -> Path:
    """Run the three stages into ``out`` (see the module docstring) and return it.

    Raises:
        ValueError: ``out`` holds files from an earlier run and ``resume`` is False.
    """
    from ..checkpoints.loaders import load_text_encoder

    cfg = cfg or TrainConfig()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise ValueError(f"{out} is not empty: pass --resume to continue that run")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    (out / "train_config.json").write_text(json.dumps(cfg.__dict__, indent=2))
    t0 = time.time()
    write_text(out, cfg)
    vae = train_vae(out, cfg)
    _log(out, {"stage": "vae", "done": True, "seconds": round(time.time() - t0, 1)})
    from ..checkpoints.layout import OFFICIAL_T5

    # the features of each caption's own tokens (padded to the official 512 here; the shipped run did so)
    text = load_text_encoder(out / OFFICIAL_T5, device="cpu", dtype=torch.float32, text_len=512)
    data = encode_dataset(out, cfg, vae, text)
    dit = train_dit(out, cfg, data)
    write_dit(out, dit)
    (out / STATE_FILE["dit"]).unlink(missing_ok=True)
    _log(out, {"stage": "dit", "done": True, "seconds": round(time.time() - t0, 1)})
    return out


def export(run: str | Path, dest: str | Path) -> Path:
    """Copy the checkpoint files of a finished run (no training state, no cached data) to ``dest``."""
    from ..checkpoints.layout import OFFICIAL_DIT_WEIGHTS, OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE

    run, dest = Path(run), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", OFFICIAL_DIT_WEIGHTS, OFFICIAL_VAE, OFFICIAL_T5, "train_log.jsonl",
                 "train_config.json"):
        shutil.copy2(run / name, dest / name)
    shutil.copytree(run / OFFICIAL_TOKENIZER, dest / OFFICIAL_TOKENIZER, dirs_exist_ok=True)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wanrt.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="run folder (the checkpoint is written there)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last state file")
    for name, value in TrainConfig().__dict__.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = p.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig().__dict__})
    train(args.out, cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
