"""ESGD-M on FSDP2 (`fully_shard`) models: 2 gloo CPU ranks against one process on the whole batch.

Each rank trains a `fully_shard`ed MLP (every Linear and the root) on its half of every batch with a
finite-difference estimator through `opt.step(closure)`. FSDP2 averages the gradients over the ranks
(reduce-scatter) into sharded DTensor gradients, the update runs on each rank's local shards, every
shard draws its slice of the probe the whole parameter would get, and h is one global scalar (one
small all-reduce). So the trajectory is the single-process one, up to the rounding of the reductions,
which the difference divides by h. Also: DCP checkpoints resume bit-identically on the same world
size and load onto one rank (resharding); per-rank optimizer state is 1/world of the model's; the
exact estimator refuses sharded parameters with an error naming the finite-difference option.
With bfloat16 state, each shard rounds with the bits of its elements' indices in the whole parameter,
so the sharded run rounds as one process does, and DCP checkpoints of it resume bit-identically and
reshard.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from _spawn import run_ranks

from esgd_cuda import ESGD

WORLD = 2
NUM_STEPS = 16
SPLIT = 7  # checkpoint after this many steps
BATCH = 16
KWARGS = dict(lr=0.3, update_d_every=3, d_warmup=4, v=0.8, weight_decay=0.01, seed=1234)
TIMEOUT_S = 300
# name -> (dtype, hvp, how the model is sharded)
SCENARIOS = {
    "forward-fp64": (torch.float64, "finite_difference", "per-layer"),
    "central-fp64": (torch.float64, "central_difference", "per-layer"),
    "forward-fp64-root": (torch.float64, "finite_difference", "root-only"),
    "forward-fp32": (torch.float32, "finite_difference", "per-layer"),
    "forward-fp32-bf16-state": (torch.float32, "finite_difference", "per-layer"),
}
# ESGD's state_dtype per scenario (None: float32 or float64 state).
STATE_DTYPE = {"forward-fp32-bf16-state": torch.bfloat16}
# The sharded run's reductions round differently from the single process's (FSDP2's reduce-scatter
# vs one batch mean, and the RMS of theta summed over shards); the difference divides that rounding
# by h: about eps / fd_step per estimate, 1.5e-8 (fp64 forward), 3.7e-11 (fp64 central), 3.4e-4
# (fp32 forward). The bounds allow the 16 steps to compound it tenfold.
TOLERANCE = {"forward-fp64": 2e-7, "central-fp64": 4e-10, "forward-fp64-root": 2e-7, "forward-fp32": 3e-3,
             # The same bits round both runs, so bf16 state keeps float32's bound (measured: 1.1e-3 for
             # both); a state element moved across a rounding threshold by the differences above lands
             # one bfloat16 spacing away, which would show here if the bits differed between ranks.
             "forward-fp32-bf16-state": 3e-3}


def make_mlp(dtype):
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 13), nn.Tanh(), nn.Linear(13, 7), nn.Tanh(), nn.Linear(7, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.6)
    return model.to(dtype)


def batch(step, dtype):
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
    y = torch.stack([torch.sin(x.sum(1)), torch.cos(x[:, 0] * x[:, 1])], dim=1)
    return x.to(dtype), y.to(dtype)


def closure_for(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def train_single(dtype, hvp, steps=NUM_STEPS, state_dtype=None):
    model = make_mlp(dtype)
    opt = ESGD(model.parameters(), hvp=hvp, **KWARGS, state_dtype=state_dtype)
    trajectory = []
    for s in range(steps):
        opt.step(closure_for(opt, model, *batch(s, dtype)))
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory, opt, model


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard(model, how):
    from torch.distributed.fsdp import fully_shard

    if how == "per-layer":
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
    fully_shard(model)
    return model


def train_sharded(rank, dtype, hvp, how, steps, model=None, opt=None, start=0, state_dtype=None):
    if model is None:
        model = shard(make_mlp(dtype), how)
        opt = ESGD(model.parameters(), hvp=hvp, **KWARGS, state_dtype=state_dtype)
    trajectory = []
    for s in range(start, start + steps):
        x, y = batch(s, dtype)
        opt.step(closure_for(opt, model, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]))
        trajectory.append([full(p.detach()).clone() for p in model.parameters()])
    return trajectory, opt, model


def state_bytes(opt):
    from torch.distributed.tensor import DTensor

    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                local = v.to_local() if isinstance(v, DTensor) else v
                total += local.numel() * local.element_size()
    return total


def checkpoint_round_trip(rank, tmpdir, dtype, hvp, how, state_dtype=None, name=None):
    """Train SPLIT steps, save model and optimizer with DCP, train on; a fresh model and optimizer
    load the checkpoint and train the same steps: bit-identical."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _, opt, model = train_sharded(rank, dtype, hvp, how, SPLIT, state_dtype=state_dtype)
    model_sd, optim_sd = get_state_dict(model, opt)
    path = os.path.join(tmpdir, name or f"dcp-{hvp}")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    continued, _, _ = train_sharded(rank, dtype, hvp, how, NUM_STEPS - SPLIT, model=model, opt=opt, start=SPLIT)

    fresh = shard(make_mlp(dtype), how)
    fresh_opt = ESGD(fresh.parameters(), hvp=hvp, **dict(KWARGS, seed=99), state_dtype=state_dtype)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=target["model"], optim_state_dict=target["optim"])
    resumed, _, _ = train_sharded(rank, dtype, hvp, how, NUM_STEPS - SPLIT, model=fresh, opt=fresh_opt, start=SPLIT)
    state_dtypes = sorted({str(v.dtype) for s in fresh_opt.state.values() for v in s.values()
                           if torch.is_tensor(v) and v.dim() > 0})
    return dict(continued=continued, resumed=resumed, path=path, state_dtypes=state_dtypes)


# Sub-batch curvature through FSDP2's own passes: each rank's curvature closure takes the first SUB
# rows of its half of the batch; one process takes the same rows of both halves.
SUB = 3
CC_SCENARIOS = {"cc-forward-fp64": "finite_difference", "cc-central-fp64": "central_difference"}
CC_TOLERANCE = {"cc-forward-fp64": 2e-7, "cc-central-fp64": 4e-10}


def train_sub_batch(hvp, rank=None):
    """One process (rank=None) or one FSDP2 rank, with opt.step(closure, curvature_closure)."""
    dtype = torch.float64
    model = make_mlp(dtype) if rank is None else shard(make_mlp(dtype), "per-layer")
    opt = ESGD(model.parameters(), hvp=hvp, **KWARGS)
    trajectory = []
    for s in range(NUM_STEPS):
        x, y = batch(s, dtype)
        halves = list(zip(x.chunk(WORLD), y.chunk(WORLD)))
        if rank is None:
            xs, ys = torch.cat([h[0][:SUB] for h in halves]), torch.cat([h[1][:SUB] for h in halves])
        else:
            (x, y), (xs, ys) = halves[rank], (halves[rank][0][:SUB], halves[rank][1][:SUB])
        opt.step(closure_for(opt, model, x, y), curvature_closure=closure_for(opt, model, xs, ys))
        trajectory.append([full(p.detach()).clone() for p in model.parameters()])
    return trajectory


def _train_all(rank, tmpdir):
    results = {}
    for name, (dtype, hvp, how) in SCENARIOS.items():
        trajectory, opt, model = train_sharded(rank, dtype, hvp, how, NUM_STEPS, state_dtype=STATE_DTYPE.get(name))
        results[name] = dict(trajectory=trajectory, state_bytes=state_bytes(opt),
                             estimates=[d["estimates"] for d in opt.diagnostics()])
    for name, hvp in CC_SCENARIOS.items():
        results[name] = train_sub_batch(hvp, rank)
    for hvp in ("finite_difference", "central_difference"):
        results[f"dcp-{hvp}"] = checkpoint_round_trip(rank, tmpdir, torch.float64, hvp, "per-layer")
    results["dcp-bf16-state"] = checkpoint_round_trip(rank, tmpdir, torch.float32, "finite_difference", "per-layer",
                                                      state_dtype=torch.bfloat16, name="dcp-bf16-state")
    try:
        ESGD(shard(make_mlp(torch.float64), "per-layer").parameters())
    except ValueError as exc:
        results["exact-error"] = str(exc)
    return results


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    tmpdir = str(tmp_path_factory.mktemp("fsdp"))
    return dict(runs=run_ranks(_train_all, WORLD, tmpdir, TIMEOUT_S), tmpdir=tmpdir)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_training_equals_one_process_on_the_whole_batch(fsdp_runs, name):
    dtype, hvp, _ = SCENARIOS[name]
    reference, ref_opt, _ = train_single(dtype, hvp, state_dtype=STATE_DTYPE.get(name))
    tol = TOLERANCE[name]
    start = list(make_mlp(dtype).parameters())
    moved = max((p - s.detach()).abs().max() for p, s in zip(reference[-1], start))
    assert moved > 0.05, "the run barely moved: the comparison would prove nothing"
    for rank, run in enumerate(fsdp_runs["runs"]):
        got = run[name]["trajectory"]
        assert run[name]["estimates"] == [d["estimates"] for d in ref_opt.diagnostics()]
        for s, (a, b) in enumerate(zip(got, reference)):
            for j, (p, q) in enumerate(zip(a, b)):
                err = float((p - q).abs().max() / q.abs().max())
                assert err <= tol, f"{name} rank {rank} step {s} param {j}: {err:.3e} from the single process"


@pytest.mark.parametrize("name", list(CC_SCENARIOS))
def test_sub_batch_curvature_on_shards_equals_one_process(fsdp_runs, name):
    reference = train_sub_batch(CC_SCENARIOS[name])
    start = list(make_mlp(torch.float64).parameters())
    assert max((p - s.detach()).abs().max() for p, s in zip(reference[-1], start)) > 0.05
    for rank, run in enumerate(fsdp_runs["runs"]):
        for s, (a, b) in enumerate(zip(run[name], reference)):
            for j, (p, q) in enumerate(zip(a, b)):
                err = float((p - q).abs().max() / q.abs().max())
                assert err <= CC_TOLERANCE[name], f"{name} rank {rank} step {s} param {j}: {err:.3e}"


@pytest.mark.parametrize("hvp", ["finite_difference", "central_difference", "bf16-state"])
def test_dcp_checkpoint_resumes_bit_identically(fsdp_runs, hvp):
    for rank, run in enumerate(fsdp_runs["runs"]):
        r = run[f"dcp-{hvp}"]
        if hvp == "bf16-state":
            assert r["state_dtypes"] == ["torch.bfloat16"], "the resumed optimizer's state is not bfloat16"
        for s, (a, b) in enumerate(zip(r["continued"], r["resumed"])):
            for j, (p, q) in enumerate(zip(a, b)):
                assert torch.equal(p, q), f"rank {rank}: resumed step {SPLIT + s} param {j} differs"


def test_optimizer_state_is_sharded(fsdp_runs):
    """Each rank holds its shards' state: about 1/world of the unsharded model's (bf16 state: half of
    float32 state's)."""
    _, opt, _ = train_single(torch.float64, "finite_difference", steps=1)
    whole = state_bytes(opt)
    per_rank = [run["forward-fp64"]["state_bytes"] for run in fsdp_runs["runs"]]
    assert sum(per_rank) == whole
    fp32 = sum(run["forward-fp32"]["state_bytes"] for run in fsdp_runs["runs"])
    assert sum(run["forward-fp32-bf16-state"]["state_bytes"] for run in fsdp_runs["runs"]) * 2 == fp32
    # FSDP2 shards dim 0 in ceil-sized chunks: a rank's share exceeds 1/world by at most a row per tensor.
    assert max(per_rank) <= whole / WORLD + 13 * 5 * 8
    assert min(per_rank) > 0


def test_exact_estimator_refuses_sharded_parameters(fsdp_runs):
    for run in fsdp_runs["runs"]:
        assert "hvp='finite_difference'" in run["exact-error"] and "DTensor" in run["exact-error"]


def _reshard_worker(tmpdir, hvp, name):
    """One rank loads the 2-rank checkpoint into a 1-rank FSDP2 model and continues."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmpdir, 'rendezvous-' + name)}", rank=0,
                            world_size=1)
    try:
        dtype, state = (torch.float32, torch.bfloat16) if name == "dcp-bf16-state" else (torch.float64, None)
        model = shard(make_mlp(dtype), "per-layer")
        opt = ESGD(model.parameters(), hvp=hvp, **KWARGS, state_dtype=state)
        model_sd, optim_sd = get_state_dict(model, opt)
        target = {"model": model_sd, "optim": optim_sd}
        dcp.load(target, checkpoint_id=os.path.join(tmpdir, name))
        set_state_dict(model, opt, model_state_dict=target["model"], optim_state_dict=target["optim"])
        out = []
        for s in range(SPLIT, NUM_STEPS):
            opt.step(closure_for(opt, model, *batch(s, dtype)))
            out.append([full(p.detach()).clone() for p in model.parameters()])
        return out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("hvp, name", [("finite_difference", "dcp-finite_difference"),
                                       ("central_difference", "dcp-central_difference"),
                                       ("finite_difference", "dcp-bf16-state")])
def test_checkpoint_of_two_ranks_continues_on_one(fsdp_runs, hvp, name):
    """Resharding 2 -> 1: the state (shards gathered by DCP), the schedule and the probe seed load
    exactly; the continuation matches the 2-rank one up to the reductions' rounding (as above)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        resumed = pool.apply(_reshard_worker, (fsdp_runs["tmpdir"], hvp, name))
    continued = fsdp_runs["runs"][0][name]["continued"]
    tol = TOLERANCE[{"dcp-finite_difference": "forward-fp64", "dcp-central_difference": "central-fp64",
                     "dcp-bf16-state": "forward-fp32-bf16-state"}[name]]
    for s, (a, b) in enumerate(zip(resumed, continued)):
        for j, (p, q) in enumerate(zip(a, b)):
            err = float((p - q).abs().max() / q.abs().max())
            assert err <= tol, f"step {SPLIT + s} param {j}: {err:.3e}"
