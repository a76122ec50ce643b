"""Deliberate defects in the mechanisms that matter, each of which the test suite must catch.

Every entry of :data:`mutants.DEFECTS` (``tests/mutants.py``) is one parametrized test here that

1. copies the ``wanrt`` package (not the tests) into ``tmp_path``,
2. applies the defect to the copy as exact source-text replacements, each anchor matching exactly once,
3. runs ``python -m pytest -q -x -p no:cacheprovider <the defect's test node ids>`` in a subprocess from the
   repository root with the copy first on ``PYTHONPATH`` (``PYTHONSAFEPATH=1`` keeps ``python -m`` from putting
   the repository root, and with it the unmodified ``wanrt``, ahead of it; a probe plugin checks in the
   subprocess that ``wanrt`` really was imported from the copy) and every cache directed into ``tmp_path``,
4. requires exit code 1: the selected tests ran and failed. Exit 0 means the defect survived; any other code
   (collection error, usage error, nothing collected or everything deselected) means the selection is broken.

The contract for later work:

* A new mechanism (sequence parallelism, offloading, LoRA, a new cache or kernel path, ...) adds its
  defects to the table: the one-line mistakes a refactor could plausibly make, each with the narrowest fast
  test (a single node id, ideally < 10 s) that catches it. If no test catches one, that is a missing test:
  write it, then add the defect.
* When code moves or is reworded, an anchor stops matching and its test fails saying so: update the anchor
  (and the file) in ``tests/mutants.py`` to the new code; do not delete the defect.
* The selections must pass on the unmodified package (the main suite runs them). A defect whose selection
  was renamed or deselected fails here with the subprocess output, not silently.

The whole table costs one subprocess per defect (interpreter + torch start-up plus one test; 4-16 s each, about
run two at a time, about 5 min for the 71 defects on 2 CPU cores), printed per defect with ``-s`` and in every failure message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mutants import DEFECTS, Defect

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "wanrt"
TAIL = 4000  # characters of subprocess output quoted in a failure

# Loaded into the subprocess with ``-p``: records where ``wanrt`` came from once the tests are collected (the
# test modules import it; conftest.py has already set the environment), and refuses to run the tests if it is
# not the mutated copy.
PROBE = '''
import os, sys

import pytest


def pytest_collection_finish(session):
    import wanrt

    origin = os.path.realpath(wanrt.__file__)
    with open(os.environ["WANRT_MUTANT_PROBE"], "w") as f:
        f.write(origin)
    expected = os.path.realpath(os.environ["WANRT_MUTANT_COPY"]) + os.sep
    if not origin.startswith(expected):
        raise pytest.UsageError(f"mutant probe: wanrt imported from {origin}, not from the copy {expected}")
'''


def _mutate(defect: Defect, root: Path) -> Path:
    """A copy of ``wanrt`` under ``root`` with ``defect`` applied; returns the directory to put on PYTHONPATH."""
    dest = root / "wanrt"
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = dest / defect.file
    if not target.is_file():
        pytest.fail(f"mutant {defect.name!r}: wanrt/{defect.file} does not exist any more; the code moved: "
                    "update the mutant in tests/mutants.py")
    text = target.read_text()
    for k, (anchor, replacement) in enumerate(defect.edits):
        n = text.count(anchor)
        if n != 1:
            pytest.fail(f"mutant {defect.name!r} needs updating, the code moved: edit {k} anchor found {n} times "
                        f"(expected exactly once) in wanrt/{defect.file}:\n{anchor}")
        assert replacement != anchor, f"mutant {defect.name!r}: edit {k} changes nothing"
        text = text.replace(anchor, replacement)
    target.write_text(text)
    return root


def _env(tmp_path: Path, copy_root: Path, probe_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_XDIST_WORKER"):
        env.pop(var, None)
    paths = [str(copy_root), str(tmp_path / "plugins")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONSAFEPATH"] = "1"  # python -m: do not prepend the cwd (the repo root holds the real wanrt)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cache = tmp_path / "cache"
    env["XDG_CACHE_HOME"] = str(cache)
    env["TRITON_CACHE_DIR"] = str(cache / "triton")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    env["HF_HOME"] = str(cache / "hf")
    env["MPLCONFIGDIR"] = str(cache / "mpl")
    env["WANRT_MUTANT_COPY"] = str(copy_root / "wanrt")
    env["WANRT_MUTANT_PROBE"] = str(probe_file)
    return env


WORKERS = 2  # defects run two at a time, each subprocess on one thread (CI has 2 cores)


def _run_defect(defect: Defect, tmp_path: Path) -> tuple[int, str, float, str, bool]:
    """Apply ``defect`` to a copy and run its selection: ``(exit code, output tail, seconds, where wanrt was
    imported from, whether that is the mutated copy)``."""
    copy_root = _mutate(defect, tmp_path / "pkg")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "wanrt_mutant_probe.py").write_text(PROBE)
    probe_file = tmp_path / "probe.txt"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "wanrt_mutant_probe",
           "--basetemp", str(tmp_path / "basetemp"), *defect.tests]
    env = _env(tmp_path, copy_root, probe_file)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - t0
    origin = probe_file.read_text() if probe_file.exists() else "(probe did not run)"
    imported_copy = origin.startswith(os.path.realpath(copy_root / "wanrt") + os.sep)
    return proc.returncode, (proc.stdout + proc.stderr)[-TAIL:], seconds, origin, imported_copy


@pytest.fixture(scope="module")
def mutant_runs(request, tmp_path_factory):
    """Start every selected defect's run at once on a pool of :data:`WORKERS`; each test waits for its own.

    A defect whose anchors no longer match fails in its own test (the future holds the exception)."""
    from concurrent.futures import ThreadPoolExecutor

    selected = [item.callspec.params["defect"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_defect_is_caught" and hasattr(item, "callspec")]
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {d.name: pool.submit(_run_defect, d, tmp_path_factory.mktemp(d.name)) for d in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.name for d in DEFECTS])
def test_defect_is_caught(defect: Defect, mutant_runs):
    code, out, seconds, origin, imported_copy = mutant_runs[defect.name].result()
    print(f"mutant {defect.name}: exit {code} in {seconds:.1f} s ({', '.join(defect.tests)})")
    if code == 0:
        pytest.fail(f"defect {defect.name!r} survived ({defect.what}; wanrt/{defect.file}): tests "
                    f"{', '.join(defect.tests)} did not catch it [{seconds:.1f} s]\n{out}")
    if code != 1:
        pytest.fail(f"mutant {defect.name!r}: the selection {', '.join(defect.tests)} did not run as tests "
                    f"(pytest exit {code}: collection/usage error or nothing collected) "
                    f"[{seconds:.1f} s]\n{out}")
    assert imported_copy, (
        f"mutant {defect.name!r}: the subprocess imported wanrt from {origin}, not from the mutated copy")
