"""The CLI end to end: an MP4 that decodes back to the right frames and size."""

import subprocess
import sys

import numpy as np
import pytest

from wanrt.cli import main
from wanrt.video import read_mp4, write_mp4


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "wanrt.cli", "--help"], capture_output=True, text=True, check=True)
    assert "generate" in out.stdout and "make-tiny-checkpoint" in out.stdout


def test_generate_writes_mp4(tmp_path, tiny_official, capsys):
    out = tmp_path / "v" / "out.mp4"
    rc = main(["generate", "--model", "tiny", "--checkpoint-dir", str(tiny_official), "--prompt", "a corgi",
               "-o", str(out), "--height", "32", "--width", "48", "--num-frames", "9", "--steps", "2",
               "--seed", "11", "--device", "cpu", "--precision", "fp32", "--solver", "euler", "--no-progress"])
    assert rc == 0
    frames, fps = read_mp4(out)
    assert frames.shape == (9, 32, 48, 3) and fps == 16
    text = capsys.readouterr().out
    assert "seed 11" in text and "denoise" in text and "vae_decode" in text


def test_make_tiny_checkpoint_then_generate_via_subprocess(tmp_path):
    ck = tmp_path / "ck"
    subprocess.run([sys.executable, "-m", "wanrt.cli", "make-tiny-checkpoint", str(ck), "--layout", "diffusers"],
                   check=True, capture_output=True)
    assert (ck / "model_index.json").is_file()
    out = tmp_path / "o.mp4"
    r = subprocess.run([sys.executable, "-m", "wanrt.cli", "generate", "--checkpoint-dir", str(ck), "--prompt",
                        "hi", "-o", str(out), "--height", "16", "--width", "32", "--num-frames", "1", "--steps", "1",
                        "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    frames, _ = read_mp4(out)
    assert frames.shape == (1, 16, 32, 3)


def test_bad_input_is_rejected_before_loading(tmp_path, monkeypatch, capsys):
    import wanrt.engine

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(wanrt.engine.Engine, "__init__", no_load)
    for argv, msg in ((["--num-frames", "8"], "num_frames must be 4k+1"), (["--height", "100"], "multiple of 16"),
                      (["--steps", "0"], "num_inference_steps"), (["-o", "x.gif"], "must end in .mp4"),
                      (["--seed", "-3"], "seed must be"), (["--crf", "52"], "crf must be an integer from 0")):
        rc = main(["generate", "--model", "t2v-14b", "--checkpoint-dir", str(tmp_path), "--prompt", "x", *argv])
        assert rc == 2
        assert msg in capsys.readouterr().err


def test_bad_input_exits_2_with_message(tmp_path, tiny_official, capsys):
    rc = main(["generate", "--checkpoint-dir", str(tiny_official), "--prompt", "x", "--num-frames", "8",
               "-o", str(tmp_path / "x.mp4"), "--device", "cpu"])
    assert rc == 2
    assert "num_frames must be 4k+1" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()
    rc = main(["generate", "--checkpoint-dir", str(tmp_path / "missing"), "--prompt", "x"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_save_rejects_other_formats(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="must end in .mp4"):
        write_mp4(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "a.gif")
    with pytest.raises(ValueError, match="even height and width"):
        write_mp4(np.zeros((1, 15, 16, 3), np.uint8), tmp_path / "a.mp4")
    for crf in (-1, 52, 1.5, True):
        with pytest.raises(ValueError, match="crf must be an integer from 0"):
            write_mp4(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "a.mp4", crf=crf)
    assert not list(tmp_path.iterdir())


def test_mp4_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (5, 1, 1, 3), dtype=np.uint8), 32, 1).repeat(48, 2)
    write_mp4(frames, tmp_path / "a.mp4", fps=16, crf=0)
    back, fps = read_mp4(tmp_path / "a.mp4")
    assert back.shape == frames.shape and fps == 16
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # flat colours survive yuv420p


def test_backend_flag(tmp_path, tiny_official, capsys, monkeypatch):
    """--backend reaches the Engine; the resolved backend is printed; a missing one exits 2 with the install
    hint before any weight is read."""
    import wanrt.checkpoints.io as io

    out = tmp_path / "b.mp4"
    args = ["generate", "--model", "tiny", "--checkpoint-dir", str(tiny_official), "--prompt", "a corgi", "-o",
            str(out), "--height", "16", "--width", "32", "--num-frames", "1", "--steps", "1", "--device", "cpu",
            "--precision", "fp32", "--no-progress"]
    assert main([*args, "--backend", "sdpa"]) == 0
    assert "(backend sdpa)" in capsys.readouterr().out

    def no_reads(*a, **k):
        raise AssertionError("weights were read before the backend was checked")

    monkeypatch.setattr(io, "load_into_module", no_reads)
    monkeypatch.setattr("wanrt.checkpoints.loaders.load_into_module", no_reads)
    assert main([*args, "--backend", "xformers"]) == 2
    err = capsys.readouterr().err
    assert "attention backend 'xformers'" in err and "pip install 'wanrt[xformers]'" in err


def test_calibrate_teacache_then_generate_with_it(tmp_path, tiny_official, capsys):
    coefs = tmp_path / "tc.json"
    common = ["--model", "tiny", "--checkpoint-dir", str(tiny_official), "--prompt", "a corgi", "--height", "32",
              "--width", "48", "--num-frames", "5", "--seed", "3", "--device", "cpu", "--precision", "fp32",
              "--no-progress"]
    assert main(["calibrate-teacache", *common, "--steps", "8", "-o", str(coefs)]) == 0
    import json

    data = json.loads(coefs.read_text())
    assert data["mode"] == "e" and len(data["coefficients"]) == 5 and data["preset"] == "tiny"
    assert len(data["input_changes"]) == len(data["output_changes"]) == 2 * 7  # two branches, 7 step pairs
    assert "use: wanrt generate" in capsys.readouterr().out
    out = tmp_path / "tc.mp4"
    assert main(["generate", *common, "--steps", "8", "--teacache-threshold", "0.05", "--teacache-coefficients",
                 str(coefs), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "teacache: cond computed" in text and out.is_file()
    # Errors: too few steps to fit, a missing or malformed coefficients file, TeaCache without coefficients.
    assert main(["calibrate-teacache", *common, "--steps", "4", "-o", str(coefs)]) == 2
    assert "at least 6 steps" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["generate", *common, "--teacache-threshold", "0.1", "--teacache-coefficients", str(bad),
                 "-o", str(out)]) == 2
    assert "not a TeaCache coefficients file" in capsys.readouterr().err
    assert main(["generate", *common, "--teacache-threshold", "0.1", "-o", str(out)]) == 2
    assert "no TeaCache coefficients for preset 'tiny'" in capsys.readouterr().err
    assert main(["generate", *common, "--cuda-graphs", "on", "-o", str(out)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_generate_with_8bit_precisions(tmp_path, tiny_official, capsys):
    out = tmp_path / "q.mp4"
    args = ["generate", "--model", "tiny", "--checkpoint-dir", str(tiny_official), "--prompt", "a corgi", "-o",
            str(out), "--height", "16", "--width", "32", "--num-frames", "1", "--steps", "1", "--device", "cpu",
            "--no-progress"]
    assert main([*args, "--precision", "int8", "--text-encoder-precision", "int8", "--offload-text-encoder"]) == 0
    assert out.is_file()
    with pytest.raises(SystemExit):  # argparse rejects an unknown precision before anything loads
        main([*args, "--precision", "fp4"])


def test_export_vae_onnx_runs_in_onnxruntime(tmp_path, tiny_official, capsys):
    import torch

    from wanrt.checkpoints.loaders import load_vae
    from wanrt.graph.onnx_vae import OnnxDecoder

    out = tmp_path / "dec.onnx"
    assert main(["export-vae", "--checkpoint-dir", str(tiny_official), "--height", "32", "--width", "48", "-o",
                 str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file() and "wrote" in capsys.readouterr().out
    vae = load_vae(tiny_official, device="cpu", dtype=torch.float32)
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    ref = vae.decode(z)
    got = OnnxDecoder(out, providers=["CPUExecutionProvider"]).decode(z)
    assert got.shape == ref.shape and ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert main(["export-vae", "--checkpoint-dir", str(tiny_official), "--height", "30", "--width", "48"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert main(["export-vae", "--checkpoint-dir", str(tiny_official), "--height", "32", "--width", "48",
                 "--format", "tensorrt", "-o", str(tmp_path / "t.onnx")]) == 2
    assert "pip install 'wanrt[trt]'" in capsys.readouterr().err


def _png(path, h, w, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_generate_image_to_video_and_first_last_frame(tmp_path, tiny_i2v_official, tiny_flf2v_official, capsys):
    first, last = _png(tmp_path / "first.png", 120, 90, 1), _png(tmp_path / "last.png", 60, 80, 2)
    common = ["--prompt", "a corgi", "--num-frames", "5", "--steps", "1", "--device", "cpu", "--precision",
              "fp32", "--no-progress"]
    out = tmp_path / "i2v.mp4"
    assert main(["generate", "--model", "tiny-i2v", "--checkpoint-dir", str(tiny_i2v_official), "--image", first,
                 "--max-area", "48*64", "-o", str(out), *common]) == 0
    frames, _ = read_mp4(out)
    assert frames.shape == (5, 64, 48, 3)  # portrait 4:3 image within 48*64 pixels
    assert "image_encoder" in capsys.readouterr().out
    out = tmp_path / "flf2v.mp4"
    assert main(["generate", "--model", "tiny-flf2v", "--checkpoint-dir", str(tiny_flf2v_official), "--image",
                 first, "--last-image", last, "-o", str(out), "--offload-image-encoder", *common]) == 0
    assert read_mp4(out)[0].shape == (5, 80, 64, 3)  # the default 64*96 area at the first image's aspect


def test_image_flags_are_checked_before_loading(tmp_path, monkeypatch, capsys):
    import wanrt.engine

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(wanrt.engine.Engine, "__init__", no_load)
    img = _png(tmp_path / "a.png", 64, 96)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cases = (
        (["--model", "t2v-14b", "--image", img], "--image needs an i2v/flf2v model"),
        (["--model", "i2v-14b-480p"], "needs --image"),
        (["--model", "i2v-14b-480p", "--image", str(tmp_path / "missing.png")], "missing.png"),
        (["--model", "i2v-14b-480p", "--image", str(tmp_path / "broken.png")], "broken.png"),
        (["--model", "i2v-14b-480p", "--image", img, "--last-image", img], "--last-image needs a first-last"),
        (["--model", "flf2v-14b-720p", "--image", img], "needs --last-image"),
        (["--model", "i2v-14b-480p", "--image", img, "--height", "480"], "both height and width"),
    )
    for argv, msg in cases:
        rc = main(["generate", "--checkpoint-dir", str(tmp_path), "--prompt", "x", *argv])
        assert rc == 2, argv
        assert msg in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["generate", "--model", "i2v-14b-480p", "--prompt", "x", "--image", img, "--max-area", "big"])
    from wanrt.cli import _area

    assert _area("832*480") == _area("832x480") == _area("399360") == 399360
