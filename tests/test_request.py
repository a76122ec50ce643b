"""One request, judged before any work: ``resolve_request`` (pure), the output path, the memory estimate, the
explicit cache directory, and the CLI that builds the request once (one line per error, exit 2 for bad input,
1 for a failure, 130 when cancelled)."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch

import wanrt
from wanrt.cli import main
from wanrt.presets import get_preset
from wanrt.request import Request, check_output_path, resolve_request


def _no_load(monkeypatch):
    import wanrt.engine

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for a bad request")

    monkeypatch.setattr(wanrt.engine.Engine, "__init__", no_load)


# ------------------------------------------------------------------------------ resolve_request


def test_resolve_request_fills_the_preset_defaults_once():
    p = get_preset("t2v-14b")
    req = resolve_request(p, "a corgi", seed=3)
    assert isinstance(req, Request)
    assert (req.height, req.width, req.num_frames, req.num_inference_steps) == (480, 832, 81, 50)
    assert (req.guidance_scale, req.shift, req.sample_solver, req.seed) == (5.0, 5.0, "unipc", 3)
    assert req.negative_prompt == p.negative_prompt and req.do_cfg and req.teacache is None
    assert req.latent_shape == (1, 16, 21, 60, 104) and req.tokens == 21 * 30 * 52
    assert resolve_request(p, "a", guidance_scale=1.0).negative_prompt is None  # no unconditional branch
    with pytest.raises(Exception):
        req.height = 720  # frozen


def test_resolve_request_sizes_the_images_and_fits_the_last_frame():
    p = get_preset("tiny-flf2v")
    first = np.zeros((100, 70, 3), np.uint8)
    req = resolve_request(p, "a", image=first, last_image=np.zeros((50, 90, 3), np.uint8), num_frames=5)
    assert (req.height, req.width, req.max_area) == (80, 64, 96 * 64)
    assert req.image.shape == (3, 100, 70) and req.last_image.shape == (3, 100, 70)
    with pytest.raises(ValueError, match="num_frames >= 5"):
        resolve_request(p, "a", image=first, last_image=first, num_frames=1)


def test_teacache_is_resolved_with_the_engine_defaults():
    p = get_preset("t2v-1.3b")
    assert resolve_request(p, "a").teacache is None
    req = resolve_request(p, "a", teacache_defaults=(0.08, "e", None))
    assert req.teacache.threshold == 0.08 and req.teacache.mode == "e" and len(req.teacache.coefficients) == 5
    assert resolve_request(p, "a", teacache_threshold=None, teacache_defaults=(0.08, "e", None)).teacache is None
    with pytest.raises(ValueError, match="no TeaCache coefficients for preset 'tiny'"):
        resolve_request(get_preset("tiny"), "a", teacache_threshold=0.1)


# ------------------------------------------------------------------------------ output path and cache directory


def test_output_path_is_judged_first(tmp_path):
    assert check_output_path(tmp_path / "new" / "dir" / "v.mp4") == tmp_path / "new" / "dir" / "v.mp4"
    assert (tmp_path / "new" / "dir").is_dir()
    with pytest.raises(ValueError, match="must end in .mp4"):
        check_output_path(tmp_path / "v.gif")
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        check_output_path(tmp_path / "d.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="cannot create the output directory .*file"):
        check_output_path(tmp_path / "file" / "v.mp4")


def test_tensorrt_cache_lives_in_an_explicit_directory(tmp_path, monkeypatch):
    from wanrt.paths import cache_root
    from wanrt.decode import Decoder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("WANRT_CACHE_DIR", raising=False)
    assert cache_root() == tmp_path / "xdg" / "wanrt"
    monkeypatch.setenv("WANRT_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    assert Decoder(None, torch.device("cpu"), "tensorrt").cache_dir == tmp_path / "explicit" / "trt"


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("argv, msg", [
    (["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
    (["--shift", "inf"], "shift must be a finite number"),
    (["--steps", "100000000"], "num_inference_steps must be an int in 1..1000"),
    (["--num-frames", "25001"], "at most 4093 frames"),
    (["--height", "16384", "--width", "16384", "--num-frames", "81"], "GiB beyond the weights"),
    (["--teacache-threshold", "0.1"], "no TeaCache coefficients"),
])
def test_cli_judges_the_request_before_loading(tmp_path, monkeypatch, capsys, argv, msg):
    _no_load(monkeypatch)
    rc = main(["generate", "--prompt", "x", "--device", "cpu", "-o", str(tmp_path / "x.mp4"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_cli_output_path_errors_before_loading(tmp_path, monkeypatch, capsys):
    _no_load(monkeypatch)
    (tmp_path / "out.mp4").mkdir()
    assert main(["generate", "--prompt", "x", "--device", "cpu", "-o", str(tmp_path / "out.mp4")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "out.mp4"]  # no .part left behind
    (tmp_path / "f").write_text("x")
    assert main(["generate", "--prompt", "x", "--device", "cpu", "-o", str(tmp_path / "f" / "v.mp4")]) == 2
    assert "cannot create the output directory" in capsys.readouterr().err


def test_cli_checkpoint_errors_are_one_line_exit_2(tmp_path, tiny_official, capsys):
    import shutil

    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_official, bad)
    dit = next(bad.glob("diffusion_pytorch_model*.safetensors"))
    dit.write_bytes(b"not a safetensors file")
    rc = main(["generate", "--checkpoint-dir", str(bad), "--prompt", "x", "--device", "cpu",
               "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and dit.name in err and len(err.strip().splitlines()) == 1, err


def test_cli_keeps_the_frames_when_the_write_fails(tmp_path, tiny_official, monkeypatch, capsys):
    def broken_save(self, path, crf=18):
        raise OSError("disk full")

    monkeypatch.setattr(wanrt.Video, "save", broken_save)
    rc = main(["generate", "--checkpoint-dir", str(tiny_official), "--prompt", "x", "--device", "cpu", "--steps", "1",
               "--num-frames", "1", "--height", "32", "--width", "48", "--no-progress", "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 1 and "disk full" in err and "frames are kept in" in err, err
    kept = err.split("frames are kept in ")[1].strip()
    frames = np.load(kept)
    assert frames.shape == (1, 32, 48, 3) and frames.dtype == np.uint8
    assert not (tmp_path / "x.mp4.part").exists()


def test_cli_ctrl_c_stops_at_the_next_step(tmp_path, tiny_official, monkeypatch, capsys):
    """The first SIGINT sets the cancel event the denoising loop checks after each step: one line, exit 130."""
    import wanrt.engine

    seen = {}
    real_run = wanrt.engine.Engine.run

    def run(self, req, *, cancel=None, **kw):
        def callback(i, n, x):
            if i == 0:
                signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 0
            seen["steps"] = i
        return real_run(self, req, cancel=cancel, callback=callback, **kw)

    monkeypatch.setattr(wanrt.engine.Engine, "run", run)
    rc = main(["generate", "--checkpoint-dir", str(tiny_official), "--prompt", "x", "--device", "cpu", "--steps", "3",
               "--num-frames", "1", "--height", "32", "--width", "48", "--no-progress", "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 130 and "cancelled after step 0" in err and len(err.strip().splitlines()) == 1, err
    assert seen["steps"] == 0 and not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.mp4.part").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
