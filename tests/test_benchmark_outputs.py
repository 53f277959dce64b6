"""Running a benchmark with its default output folder leaves the clone clean: runs write to the
ignored benchmarks/out/, and the committed results in benchmarks/results/ change only when a run is
pointed there with --out. Every table a run writes names the command and commit that produced it."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"


def git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def clone_status():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    return lambda: git("status", "--porcelain", "--untracked-files=all")


@pytest.fixture
def convergence(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import convergence

    return convergence


def test_default_run_leaves_git_status_clean(clone_status, convergence):
    committed = {p: p.read_bytes() for p in (BENCH_DIR / "results").iterdir() if p.is_file()}
    before = clone_status()
    result = convergence.main(["--smoke", "--device", "cpu", "--no-progress", "--problems", "quadratic"])
    written = [result["outputs"]["json"], result["outputs"]["markdown"], *result["outputs"]["png"]]
    try:
        head = git("rev-parse", "--short=12", "HEAD").strip()
        assert (f"Produced by `python benchmarks/convergence.py --smoke --device cpu --no-progress --problems "
                f"quadratic` at commit {head}") in result["outputs"]["markdown"].read_text()
        for path in written:
            assert path.parent == BENCH_DIR / "out", path
            assert git("check-ignore", str(path)).strip(), f"{path} is not ignored by git"
        assert clone_status() == before
        assert {p: p.read_bytes() for p in committed} == committed, "a default run rewrote benchmarks/results/"
    finally:
        for path in written:
            path.unlink(missing_ok=True)
