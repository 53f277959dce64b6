"""The finite-difference benchmark scripts run end to end at a tiny size, so they cannot rot unnoticed."""

import json
import math
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import fd_accuracy
    import fd_cost

    return fd_cost, fd_accuracy


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_fd_cost_smoke(bench, tmp_path):
    fd_cost, _ = bench
    result = fd_cost.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads(result["outputs"]["json"].read_text())
    markdown = result["outputs"]["markdown"].read_text()
    mlp = data["mlp"]
    for mode in ("exact", "forward", "central"):
        row = mlp["modes"][mode]
        for key in ("passes_ms", "step_ms", "amortized_ms", "amortized_vs_adam"):
            assert _positive(row[key]), (mode, key, row)
    assert set(data["lm"]["amortized"]) == {"adam", "finite_difference", "central_difference", "exact",
                                            "finite_difference@1/4", "central_difference@1/4", "exact@1/4"}
    assert data["lm"]["amortized"]["adam"]["vs_adam"] == 1.0
    assert all(_positive(r["ms_per_step"]) for r in data["lm"]["amortized"].values())
    assert set(data["memory"]) == {"plain", "exact", "finite_difference", "central_difference"}
    assert all(math.isfinite(m["grown_mib"]) for m in data["memory"].values())
    assert "overhead / passes" in markdown and "Peak memory" in markdown
    # Page faults: one count per timed row, each a non-negative number (0 is common).
    assert set(mlp["page_faults"]) == set(mlp["times_ms"])
    assert all(isinstance(n, (int, float)) and n >= 0 for n in mlp["page_faults"].values())
    assert "page faults / call" in markdown


def test_fd_accuracy_smoke(bench, tmp_path):
    _, fd_accuracy = bench
    result = fd_accuracy.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads(result["outputs"]["json"].read_text())
    rows = {(r["model"], r["hvp"]): r for r in data["accuracy"]}
    # On the smooth MLP both differences agree with autograd; the central one more closely.
    assert rows[("mlp", "finite_difference")]["default_error"] < 1e-2
    assert rows[("mlp", "central_difference")]["default_error"] < 1e-3
    assert {r["hvp"] for r in data["relu"]["runs"]} == {"autograd", "finite_difference", "central_difference"}
    for r in data["relu"]["runs"]:
        assert r["final_acc"] is not None and 0.0 <= r["final_acc"] <= 1.0
    assert "default" in result["outputs"]["markdown"].read_text()
    # A curvature estimate from half the batch: its D is the whole batch's plus the slices' variance.
    bias = {r["fraction"]: r for r in data["sub_batch_bias"]}
    assert bias[1]["trace_ratio"] == pytest.approx(1.0) and bias[1]["median_ratio"] == pytest.approx(1.0)
    assert bias[0.5]["trace_ratio"] > 1.05 and bias[0.5]["slice"] == bias[1]["batch"] // 2
    assert "Sub-batch curvature" in result["outputs"]["markdown"].read_text()


def test_fsdp_cost_smoke(monkeypatch, tmp_path):
    """The sharded model's collectives: an estimation step of a forward (central) difference adds one
    (two) FSDP2 forward+backward's worth of traffic, plus the 8-byte all-reduce of h, and the checked
    first estimate one more; state is halved."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import fsdp_cost

    result = fsdp_cost.main(["--smoke", "--out", str(tmp_path)])
    payload = result["payload"]
    extra = payload["per_param_extra"]
    plain = payload["counts"]["finite_difference/plain"]
    estimation = payload["counts"]["finite_difference/estimation"]
    checked = payload["counts"]["finite_difference/checked estimation"]
    assert tuple(estimation["c10d.allreduce_.default"]) == (1, 8)
    for op, (calls, nbytes) in plain.items():
        assert tuple(estimation[op]) == (2 * calls, 2 * nbytes), op
        # The first estimate repeats its pass at theta + h z: three rounds of FSDP2's traffic.
        assert tuple(checked[op]) == (3 * calls, 3 * nbytes), op
    # The h all-reduce: 8 bytes in, 8 out, whatever the model's size; the rest scales with the passes.
    h_bytes = 8 / payload["params"]
    assert extra["central_difference"] - extra["finite_difference"] == pytest.approx(
        extra["finite_difference"] - h_bytes, rel=1e-9)
    assert payload["state_bytes_per_rank"] * 2 == payload["unsharded_state_bytes"]


def test_closure_check_smoke(monkeypatch, tmp_path):
    """Correct closures repeat bit for bit on CPU (ratio 0); another batch or unreplayed dropout
    lands above the ratio at which ESGD refuses an estimate."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import closure_check

    result = closure_check.main(["--smoke", "--out", str(tmp_path)])
    runs = {(r["setting"], r["hvp"], r["closure"]): r for r in result["runs"]}
    for (setting, hvp, kind), r in runs.items():
        assert r["repeat_ratio"], (setting, hvp, kind)
        if kind == "correct":
            assert max(r["repeat_ratio"]) == 0.0, (setting, hvp, r["repeat_ratio"])
        else:
            assert min(r["repeat_ratio"]) > result["tolerance"], (setting, hvp, kind, r["repeat_ratio"])
    assert "repeat ratio" in result["outputs"]["markdown"].read_text()
