"""The tiny model's training code (wanrt.demo.train): deterministic, resumable bit for bit, the latent
re-standardisation exact; and the VAE's CPU convolution through oneDNN (the speed-up the CPU demo relies on) equal
to torch's reference convolution to float32 rounding."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from wanrt.demo import train as T

SMALL = dict(vae_steps=3, vae_batch=1, dit_steps=4, dit_batch=4, dit_clips=12, save_every=2, standardize_clips=8)


def _weights(folder):
    from safetensors.torch import load_file

    from wanrt.checkpoints.layout import OFFICIAL_DIT_WEIGHTS, OFFICIAL_VAE

    return load_file(str(folder / OFFICIAL_DIT_WEIGHTS)), torch.load(folder / OFFICIAL_VAE, weights_only=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    return T.train(tmp_path_factory.mktemp("straight") / "run", T.TrainConfig(**SMALL))


def test_a_run_writes_a_loadable_official_checkpoint_and_a_loss_log(straight_run):
    import wanrt

    log = [json.loads(line) for line in (straight_run / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"vae", "dit"} and all("seconds" in r for r in log)
    assert not list(straight_run.glob("train_state_*.pt"))  # finished: no state left behind
    engine = wanrt.Engine("tiny", straight_run, device="cpu", precision="fp32")
    video = engine.generate("a red circle moves left", num_inference_steps=2, height=64, width=64, num_frames=5,
                            progress=False)
    assert video.frames.shape == (5, 64, 64, 3)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, straight_run):
    """The DiT stage dies at its 4th step (after the state of step 2 was saved); --resume finishes it, and the
    weights equal an uninterrupted run's bit for bit (every batch comes from a generator seeded by the step)."""
    calls = {"n": 0}
    real = T._context

    def dying(feats):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(feats)

    monkeypatch.setattr(T, "_context", dying)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        T.train(out, T.TrainConfig(**SMALL))
    assert (out / T.STATE_FILE["dit"]).is_file()
    with pytest.raises(ValueError, match="--resume"):
        T.train(out, T.TrainConfig(**SMALL))
    monkeypatch.setattr(T, "_context", real)
    T.train(out, T.TrainConfig(**SMALL), resume=True)
    (dit_a, vae_a), (dit_b, vae_b) = _weights(straight_run), _weights(out)
    assert set(dit_a) == set(dit_b)
    assert all(torch.equal(dit_a[k], dit_b[k]) for k in dit_a)
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)


def test_standardizing_the_latents_keeps_the_reconstruction():
    from wanrt.checkpoints.tiny import randomize_, tiny_vae_config
    from wanrt.models.vae import WanVAE
    from wanrt.presets import get_preset

    vae = randomize_(WanVAE(tiny_vae_config(get_preset("tiny"))), 1).eval()
    x, _ = T._clips_tensor([5, 6], (64, 64, 9))
    before = vae.decode(vae.encode(x))
    m, s = T.standardize_latents_(vae, T.TrainConfig(), clips=64)
    assert s.min() < 0.5 or m.abs().max() > 0.2  # the random VAE's latents were far from N(0, 1)
    z = vae.encode(x)
    after = vae.decode(z)
    assert (after - before).abs().max() < 1e-4
    assert abs(z.mean()) < 0.3 and 0.7 < z.std() < 1.3


@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 1, 1)])
def test_cpu_conv3d_goes_through_onednn_and_matches_the_reference(stride):
    from wanrt.models.vae import conv3d

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 12, 10, generator=g, requires_grad=True)
    w = torch.randn(6, 8, 3, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    with torch.profiler.profile() as prof:
        y = conv3d(x, w, b, stride, (0, 1, 1))
    names = {e.name for e in prof.events()}
    assert "aten::mkldnn_convolution" in names and "aten::slow_conv3d_forward" not in names
    ref = F.conv3d(x, w, b, stride, (0, 1, 1))
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    gy = torch.autograd.grad(y.square().sum(), (x, w, b))
    gr = torch.autograd.grad(ref.square().sum(), (x, w, b))
    for a, r in zip(gy, gr, strict=True):
        assert (a - r).abs().max() <= 1e-5 * r.abs().max()
    half = conv3d(x.detach().to(torch.bfloat16), w.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16), stride,
                  (0, 1, 1))
    assert half.dtype == torch.bfloat16  # other dtypes keep torch's own dispatch


def test_the_dit_loss_weighs_the_latent_positions_an_object_covers():
    """``latent_foreground`` maps the object pixels of a 9-frame clip onto its 3 latent frames (frame 0 alone, then
    frames 1-4 and 5-8, as the VAE's causal chunks) and 8x8 latent pixels."""
    x = torch.full((1, 3, 9, 32, 32), -0.5)  # a plain background
    x[:, 0, 0, 0:4, 0:4] = 1.0  # frame 0: top-left block
    x[:, 0, 2, 8:12, 24:28] = 1.0  # frame 2 (latent frame 1): block (1, 3)
    x[:, 0, 8, 24:26, 16:18] = 1.0  # frame 8 (latent frame 2): block (3, 2)
    m = T.latent_foreground(x)
    assert m.shape == (1, 1, 3, 4, 4)
    want = torch.zeros(1, 1, 3, 4, 4)
    want[0, 0, 0, 0, 0] = want[0, 0, 1, 1, 3] = want[0, 0, 2, 3, 2] = 1.0
    assert torch.equal(m, want)
