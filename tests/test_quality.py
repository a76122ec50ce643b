"""The quality gate in CI: the trained tiny model makes the videos its prompts ask for, and every lossy path keeps
the documented floor of ``benchmarks/quality.py`` (adherence within the row's points of the reference, PSNR against
the reference's frames), on the smaller CI gate (16 held-out prompts, UniPC 30 steps, CFG 5)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def _quality():
    # Imported by its name from the benchmarks folder (on sys.path), so that the gate's spawned gloo ranks can
    # import it too.
    if str(QUALITY.parent) not in sys.path:
        sys.path.insert(0, str(QUALITY.parent))
    import quality

    return quality


@pytest.fixture(scope="module")
def gate():
    q = _quality()
    results = q.run_gate(device="cpu", **q.CI_GATE)
    return q, {r["name"]: r for r in results}


def test_the_trained_model_is_the_default_tiny_checkpoint():
    import wanrt
    from wanrt.checkpoints.tiny import TRAINED_TINY

    engine = wanrt.Engine("tiny", device="cpu", precision="fp32")
    assert engine.checkpoint_dir == TRAINED_TINY
    files = [p for p in TRAINED_TINY.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert (TRAINED_TINY / "MODEL_CARD.md").is_file()


def test_the_reference_row_adheres(gate):
    q, rows = gate
    assert rows["reference"]["adherence"] >= q.CI_MIN_ADHERENCE


def test_every_row_ran_and_keeps_its_floor(gate):
    q, rows = gate
    expected = {r.name for r in q.rows("cpu") if r.needs is None}
    assert expected <= set(rows), f"rows missing: {expected - set(rows)}"
    errors = {n: r["error"] for n, r in rows.items() if "error" in r}
    assert not errors, errors
    assert q.check_floors(list(rows.values()), min_adherence=q.CI_MIN_ADHERENCE) == []


def test_the_gate_tells_paths_apart(gate):
    """The gate measures something: exact paths reproduce the reference's frames, lossy ones do not, TeaCache skips
    more steps at a higher threshold."""
    _, rows = gate
    for exact in ("streamed-decode",):
        assert rows[exact]["psnr"] == 100.0
    for lossy in ("fp8", "teacache-0.20", "unipc-4-steps"):
        assert rows[lossy]["psnr"] < 60
    skipped = [np.mean(rows[f"teacache-{t:.2f}"]["skipped"]) for t in (0.05, 0.10, 0.20)]
    assert skipped[0] <= skipped[1] <= skipped[2] and skipped[2] > 0


def test_the_adherence_score_rejects_the_wrong_prompt(gate):
    """Scored against another prompt's spec, the reference's frames fail: adherence is about the prompt, not about
    making any clean clip."""
    from wanrt.demo.adherence import adheres

    ref = gate[1]["reference"]
    frames, specs = ref["frames"], ref["specs"]
    hits = sum(adheres(f, specs[(k + 3) % len(specs)]) for k, f in enumerate(frames))
    assert hits <= len(frames) // 4


def test_the_readme_command_shows_a_red_circle_moving_left(tmp_path):
    """`wanrt generate --model tiny --prompt "a red circle moves left"` (the preset's defaults: 64x96, 9 frames,
    4 UniPC steps): the MP4 it writes, read back, shows a red object moving left."""
    import av

    from wanrt.cli import main
    from wanrt.demo.adherence import read_clip

    out = tmp_path / "circle.mp4"
    assert main(["generate", "--model", "tiny", "--prompt", "a red circle moves left", "--seed", "0",
                 "-o", str(out)]) in (0, None)
    with av.open(str(out)) as f:
        frames = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
    assert frames.shape == (9, 64, 96, 3)
    reading = read_clip(frames)
    assert (reading.color, reading.motion) == ("red", "left"), reading
    other = read_clip(frames[::-1])  # the same frames backwards: moving right (the score reads the motion)
    assert other.motion == "right"
