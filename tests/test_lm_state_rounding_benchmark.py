"""benchmarks/lm_state_rounding.py: its rounding rules are the ones it names (stochastic rounding
unbiased onto bfloat16 values, nearest equal to torch's cast), an unrounded run is the plain float32
run, and it runs end to end at a tiny size."""

import json
import math
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def lsr(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import lm_state_rounding

    return lm_state_rounding


def test_stochastic_rounding_lands_on_neighbours_and_is_unbiased(lsr):
    gen = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 3 / 512, dtype=torch.float32)  # 3/4 of the way from 1 to 1 + 2^-7
    y = lsr.round_sr(x, gen)
    assert torch.equal(y.to(torch.bfloat16).float(), y)  # bfloat16 values
    assert set(y.unique().tolist()) == {1.0, 1.0 + 1 / 128}
    assert (y == 1.0 + 1 / 128).float().mean().item() == pytest.approx(0.75, abs=0.005)
    neg = lsr.round_sr(-x, gen)
    assert neg.mean().item() == pytest.approx(-x[0].item(), rel=1e-4)  # magnitude rounding, sign kept
    z = torch.randn(1000, generator=gen)
    assert torch.equal(lsr.round_rtn(z, gen), z.to(torch.bfloat16).float())


def test_ulp_nudge_moves_each_nonzero_element_one_float32_spacing(lsr):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10_000, generator=gen)
    x[::7] = 0.0
    y = lsr.nudge_ulp(x, gen)
    moved = (y.view(torch.int32) - x.view(torch.int32))[x != 0]
    assert set(moved.unique().tolist()) == {-1, 1}
    assert abs(moved.float().mean().item()) < 0.05  # up and down alike
    assert torch.equal(y[x == 0], x[x == 0])
    assert torch.all((y.sign() == x.sign()) & torch.isfinite(y))


def test_variants_parse_and_bad_ones_are_named(lsr):
    assert lsr.parse_variant("m=rtn") == {"m": "rtn", "D": "none"}
    assert lsr.parse_variant("float32") == {"m": "none", "D": "none"}
    assert lsr.parse_variant("bf16") == {"bf16": True}
    assert lsr.draws_bits("m=none,D=sr") and lsr.draws_bits("D=ulp")
    assert not lsr.draws_bits("m=rtn") and not lsr.draws_bits("bf16")
    for bad in (["--variants", "m=up"], ["--first-seed", "-1"], ["--round-seeds", "-2"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            lsr.parse_args(bad)
    with pytest.raises(ValueError, match="'x=sr'"):
        lsr.parse_variant("x=sr")


def test_smoke_run(lsr, tmp_path):
    result = lsr.main(["--smoke", "--seeds", "2", "--variants", "m=sr,D=sr", "m=rtn", "bf16",
                       "--round-seeds", "0", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "lm_state_rounding_smoke.json").read_text())
    rows = [(r["variant"], r["round_seed"]) for r in data["rows"]]
    # Stochastic variants run once per round seed, the others once.
    assert rows == [("float32", 0), ("m=sr,D=sr", 0), ("m=sr,D=sr", 1), ("m=rtn", 0), ("bf16", 0)]
    for r in data["rows"]:
        assert all(math.isfinite(x) and x < math.log(256) for x in r["per_seed"]), r
    assert data["rows"][0]["diff"] == 0.0
    # Rounding changes the run, and two streams of bits change it differently.
    sr0, sr1 = data["rows"][1]["per_seed"], data["rows"][2]["per_seed"]
    assert sr0 != data["rows"][0]["per_seed"] and sr0 != sr1
    assert [n["variant"] for n in result["noise"]] == ["m=sr,D=sr"]
    assert "Trajectory noise, m=sr,D=sr" in (tmp_path / "lm_state_rounding_smoke.md").read_text()


def test_unrounded_run_is_the_plain_float32_run(lsr, monkeypatch):
    """The baseline goes through the same code as the rounded runs, with nothing changed."""
    import lm_curvature as lm

    shape = dict(lm.PRESETS["smoke"])
    corpus = lm.load_corpus(None)
    cfg = dict(opt="esgd", hvp="central_difference", fraction=0.25, every=10, lr=0.3, name_lr=False,
               state_dtype="float32")
    plain = lm.run_one(cfg, 3, corpus, shape)["final_val"]
    assert lsr.run_variant("float32", 3, 0, corpus, shape) == plain
    assert lsr.run_variant("m=none,D=sr", 3, 0, corpus, shape) != plain
    assert lm.make_step.__name__ == "make_step"  # the patch is undone
