"""benchmarks/lm_curvature.py (sub-batch curvature on a byte-level GPT) runs end to end at a tiny size,
and its analysis (time to AdamW's best loss, step-time ratios) is right on hand-made runs."""

import json
import math
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def lm(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import lm_curvature

    return lm_curvature


def test_smoke_run_writes_every_setting(lm, tmp_path):
    result = lm.main(["--smoke", "--seeds", "1", "--estimators", "autograd", "finite_difference",
                      "--fractions", "1", "0.25", "--every", "10", "--adamw-lrs", "0.01", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "lm_curvature_smoke.json").read_text())
    markdown = (tmp_path / "lm_curvature_smoke.md").read_text()
    rows = data["aggregate"]["rows"]
    assert [r["name"] for r in rows] == [
        "AdamW lr=0.01",
        "ESGD-M exact, curvature 1, every 10", "ESGD-M exact, curvature 1/4, every 10",
        "ESGD-M forward, curvature 1, every 10", "ESGD-M forward, curvature 1/4, every 10",
    ]
    for r in rows:
        assert math.isfinite(r["final_val"]) and r["final_val"] < math.log(256), r  # learned something
        assert r["step_ratio"] > 0 and r["steady_ratio"] > 0
    assert rows[0]["step_ratio"] == pytest.approx(1.0)
    assert "pydoc_data.topics" in markdown and "Goals (curvature from a quarter of each batch)" in markdown
    # The sub-batch runs really estimated from the slice: they differ from the whole-batch runs.
    assert rows[2]["final_val"] != rows[1]["final_val"] and rows[4]["final_val"] != rows[3]["final_val"]
    assert result["aggregate"]["target"] == data["aggregate"]["target"]


def test_state_dtypes_option_runs_bf16_state(lm, tmp_path):
    """--state-dtypes float32 bfloat16: each ESGD-M setting runs with both, named apart."""
    lm.main(["--smoke", "--seeds", "1", "--estimators", "finite_difference", "--fractions", "1", "--every", "10",
             "--adamw-lrs", "0.01", "--state-dtypes", "float32", "bfloat16", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "lm_curvature_smoke.json").read_text())["aggregate"]["rows"]
    assert [r["name"] for r in rows] == ["AdamW lr=0.01", "ESGD-M forward, curvature 1, every 10",
                                         "ESGD-M forward, curvature 1, every 10, bf16 state"]
    assert all(math.isfinite(r["final_val"]) and r["final_val"] < math.log(256) for r in rows)
    assert rows[2]["config"]["state_dtype"] == "bfloat16" and rows[1]["final_val"] != rows[2]["final_val"]


def test_first_seed_extends_an_earlier_run(lm, tmp_path):
    """--first-seed 1 --seeds 1 runs seed 1 alone, exactly as the second seed of --seeds 2 (so more
    seeds can be added to an earlier run's table)."""
    common = ["--smoke", "--estimators", "finite_difference", "--fractions", "1", "--every", "10",
              "--adamw-lrs", "0.01", "--state-dtypes", "bfloat16"]
    both = lm.main(common + ["--seeds", "2", "--out", str(tmp_path / "both")])
    second = lm.main(common + ["--seeds", "1", "--first-seed", "1", "--out", str(tmp_path / "second")])
    assert [r["seed"] for r in second["runs"]] == [1, 1]
    earlier = {r["name"]: r["final_val"] for r in both["runs"] if r["seed"] == 1}
    assert {r["name"]: r["final_val"] for r in second["runs"]} == earlier
    assert earlier != {r["name"]: r["final_val"] for r in both["runs"] if r["seed"] == 0}
    with pytest.raises(SystemExit):
        lm.parse_args(["--first-seed", "-1"])


def test_corpus_is_real_text_and_split(lm, tmp_path):
    train, val, name = lm.load_corpus(None)
    assert len(train) > 400_000 and len(val) > 40_000
    text = bytes(train[:5000].tolist()).decode("utf-8", errors="replace")
    assert text.count(" the ") > 10, "expected English prose"
    path = tmp_path / "t.txt"
    path.write_bytes(b"x" * 100)
    with pytest.raises(SystemExit, match="too little text"):
        lm.load_corpus(path)


def fake_run(name, cfg, seed, vals, times):
    """A run whose validation losses at steps 10, 20, ... are `vals`, each step taking times[i]."""
    step_times = [t for t in times for _ in range(10)]
    curve, elapsed = [], 0.0
    for i, v in enumerate(vals):
        elapsed += 10 * times[i]
        curve.append((10 * (i + 1), v, elapsed))
    return dict(name=name, config=cfg, seed=seed, step_times=step_times, curve=curve, final_val=vals[-1])


def test_aggregate_times_to_the_best_adamw_loss(lm):
    adam = dict(opt="adamw", lr=1e-3)
    adam2 = dict(opt="adamw", lr=1e-2)
    esgd = dict(opt="esgd", hvp="finite_difference", fraction=0.25, every=10, lr=0.3)
    runs = [
        fake_run("AdamW lr=0.001", adam, 0, [3.0, 2.5, 2.0, 1.8], [1.0] * 4),
        fake_run("AdamW lr=0.01", adam2, 0, [3.0, 2.8, 2.6, 2.4], [1.0] * 4),
        # Reaches 1.8 at step 20, at 1.1 s per step: 22 s against AdamW's 40 s.
        fake_run("ESGD", esgd, 0, [2.0, 1.7, 1.6, 1.5], [1.1] * 4),
    ]
    agg = lm.aggregate(runs)
    assert agg["target"] == 1.8 and agg["best_adamw"] == "AdamW lr=0.001"
    assert agg["adamw_steps_to_target"] == 40
    row = next(r for r in agg["rows"] if r["name"] == "ESGD")
    assert row["steps_to_target"] == 20
    assert row["time_to_target_ratio"] == pytest.approx(22 / 40)
    assert row["step_ratio"] == pytest.approx(1.1) and row["steady_ratio"] == pytest.approx(1.1)
    never = lm.aggregate(runs[:2] + [fake_run("ESGD", esgd, 0, [3.0, 2.9, 2.9, 2.9], [1.0] * 4)])
    assert next(r for r in never["rows"] if r["name"] == "ESGD")["time_to_target_ratio"] is None


def test_configurations_spread_adamw_over_the_grid(lm):
    args = lm.parse_args([])
    configs = lm.configurations(args)
    assert len(configs) == 3 + 3 * 4 * 2
    positions = [i for i, c in enumerate(configs) if c["opt"] == "adamw"]
    assert positions == [0, 9, 18]
    names = {lm.config_name(c) for c in configs}
    assert "ESGD-M central, curvature 1/8, every 20" in names and "AdamW lr=0.003" in names


def test_exact_hz_passes_run_under_the_math_kernel(lm, monkeypatch):
    """The default SDPA has no double backward: the exact estimator's passes must switch kernels,
    and only those (the closure's update pass keeps the default)."""
    entered = []
    real = lm.math_sdpa

    def spy():
        entered.append(1)
        return real()

    monkeypatch.setattr(lm, "math_sdpa", spy)
    torch.manual_seed(0)
    model = lm.GPT(16, 1, 2, 8)
    cfg = dict(opt="esgd", hvp="autograd", fraction=0.5, every=10, lr=0.3)
    opt, step = lm.make_step(cfg, model, list(model.parameters()), 0)
    x = torch.randint(0, 256, (4, 8))
    step(x, x)  # an estimation step: the curvature closure's one pass
    assert entered == [1]
