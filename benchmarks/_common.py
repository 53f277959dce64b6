"""Helpers shared by the benchmark scripts: environment description, output files, tables."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Runs write here (ignored by git), so a run leaves the clone clean; the committed tables and plot
# in benchmarks/results/ are regenerated on purpose, with --out benchmarks/results.
DEFAULT_OUT = BENCH_DIR / "out"
OUT_HELP = "output folder (default: benchmarks/out/, ignored by git; benchmarks/results/ holds the committed results)"


def import_esgd():
    """Import esgd_cuda, falling back to the source checkout.

    Running ``python benchmarks/x.py`` puts ``benchmarks/`` (not the repo root) on sys.path, so an
    uninstalled in-place build would otherwise be invisible. An installed package always wins.
    """
    try:
        import esgd_cuda
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        import esgd_cuda
    import esgd_cuda._extension
    import esgd_cuda.functional
    return esgd_cuda


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available in this torch build / machine")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return device


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(script: str, argv) -> str:
    """The command that reproduces a run, for the header of its table."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(str(a)) for a in args)])


def git_commit() -> str | None:
    """The checkout's commit, marked when tracked files differ from it; None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" with uncommitted changes" if dirty else "")


def environment(device: torch.device, command: str | None = None) -> dict:
    esgd_cuda = import_esgd()
    try:
        ext = dict(esgd_cuda.extension_info())
    except Exception as exc:  # a broken extension must not stop the benchmark from describing it
        ext = {"error": repr(exc)}
    env = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "esgd_cuda_extension": {k: _jsonable(v) for k, v in ext.items()},
        "load_avg_1min": load_average(),
        "commit": git_commit(),
        "command": command,
    }
    return env


def load_average() -> float | None:
    """Timings on a shared machine mean little without knowing what else was running."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def environment_markdown(env: dict) -> str:
    lines = [
        f"- Produced by `{env.get('command') or '?'}` at commit {env.get('commit') or 'unknown (not a git checkout)'}",
        f"- CPU: {env['cpu']} ({env['cpu_count']} logical cores, torch threads: {env['threads']})",
        f"- Python {env['python']}, torch {env['torch']}, CUDA build {env['cuda_build'] or 'none'}",
        f"- Device: {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else ""),
    ]
    if env.get("load_avg_1min") is not None:
        lines.append(f"- Load average (1 min) when the run started: {env['load_avg_1min']:.2f}"
                     + (f", when it ended: {env['load_avg_end']:.2f}" if env.get("load_avg_end") is not None
                        else ""))
    ext = env.get("esgd_cuda_extension") or {}
    loaded = ext.get("loaded", ext.get("LOADED"))
    lines.append(f"- esgd_cuda native extension loaded: {loaded}"
                 + (f" (error: {ext.get('error') or ext.get('load_error')})" if not loaded else ""))
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(out)


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _finite_or_null(obj):
    """Strict JSON has no NaN/Infinity; "not reached" / "diverged" become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_outputs(out_dir: Path, stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    md_path = out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(_finite_or_null(payload), indent=2, allow_nan=False) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path
