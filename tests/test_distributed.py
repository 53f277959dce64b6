"""Data-parallel ESGD: DDP replicas over gloo (2 CPU processes), and sharded (FSDP-style) updates.

The DDP tests spawn the two ranks once per module (fixture `ddp_runs`); each rank trains a small
MLP on its half of every batch through DistributedDataParallel, with
``with opt.ddp_no_sync(ddp): opt.backward(loss)`` so that estimation steps average the gradient
and Hz over the group inside ESGD, and plain steps are DDP's. Ranks report through files; a failing
rank fails the tests with its traceback, and a hung run is killed after DDP_TIMEOUT_S.
"""


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _spawn import run_ranks

from esgd_cuda import ESGD, _extension
from esgd_cuda.functional import esgd_update, state_dtype

WORLD = 2
NUM_STEPS = 25  # d_warmup=5, update_d_every=4: estimation steps 0-4, 8, 12, ..., 24; the rest plain
BATCH = 16
KWARGS = dict(lr=0.3, update_d_every=4, d_warmup=5, v=0.8, weight_decay=0.01)
DDP_TIMEOUT_S = 240

# name -> (dtype, seed per rank (a function of the rank), micro-batches per step, reference seed)
SCENARIOS = {
    "fp64": (torch.float64, lambda rank: 42, 1, 42),
    "fp32": (torch.float32, lambda rank: 42, 1, 42),
    "seeds-differ": (torch.float64, lambda rank: 1000 + 7 * rank, 1, 1000),
    "accumulate-k2": (torch.float64, lambda rank: 42, 2, 42),
    "fp32-bf16-state": (torch.float32, lambda rank: 42, 1, 42),
}
# ESGD's state_dtype per scenario (None: float32 state).
STATE_DTYPE = {"fp32-bf16-state": torch.bfloat16}
FUSED = {"fused=False": False, "fused=None": None}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4}
# bf16 state rounds with the same bits on every rank and in one process, so it keeps float32's bound:
# only a float32 rounding difference of the reductions that straddles a rounding threshold (about
# 1e-7 relative against a spacing of 4e-3: a few in 1e5 roundings) could move a state element by one
# bfloat16 spacing.
STATE_TOLERANCE = {"fp32-bf16-state": 2e-4}

# Finite-difference estimators under plain DDP: every closure pass is an ordinary DDP backward
# (gradients averaged by DDP's reducer), and replicas draw the same z and h. name -> (dtype, hvp).
FD_SCENARIOS = {
    "fd-forward-fp64": (torch.float64, "finite_difference"),
    "fd-central-fp64": (torch.float64, "central_difference"),
    "fd-forward-fp32": (torch.float32, "finite_difference"),
}
# The DDP mean and the whole-batch mean round differently; the difference divides that rounding by
# h (relative step sqrt(eps) forward, eps^(1/3) central), so per estimate Hz differs by about
# eps / fd_step: 1.5e-8 (fp64 forward), 3.7e-11 (fp64 central), 3.4e-4 (fp32 forward); the bounds
# below allow the 25 steps to compound it tenfold.
FD_TOLERANCE = {"fd-forward-fp64": 2e-7, "fd-central-fp64": 4e-10, "fd-forward-fp32": 3e-3}


def make_mlp(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.6)
    return model.to(dtype)


def batch(step, dtype):
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
    y = torch.stack([torch.sin(x.sum(1)), torch.cos(x[:, 0] * x[:, 1])], dim=1)
    return x.to(dtype), y.to(dtype)


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in model.parameters()
    ]
    return params, state


def train_single(dtype, seed, fused, state_dtype=None):
    """The reference: one process, the whole batch, mean loss."""
    model = make_mlp(dtype)
    opt = ESGD(model.parameters(), **KWARGS, seed=seed, fused=fused, state_dtype=state_dtype)
    for s in range(NUM_STEPS):
        x, y = batch(s, dtype)
        opt.zero_grad()
        opt.backward(F.mse_loss(model(x), y))
        opt.step()
    return snapshot(model, opt)


def train_replica(rank, dtype, seed, k, fused, state_dtype=None):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_mlp(dtype)
    ddp = DDP(model)
    opt = ESGD(ddp.parameters(), **KWARGS, seed=seed, fused=fused, process_group=dist.group.WORLD,
               state_dtype=state_dtype)
    estimated = []
    for s in range(NUM_STEPS):
        x, y = batch(s, dtype)
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        estimated.append(opt.should_create_graph())
        opt.zero_grad()
        for j, (xb, yb) in enumerate(zip(x.chunk(k), y.chunk(k))):
            # Standard DDP accumulation: no_sync except on the last micro-batch, where ESGD decides.
            ctx = opt.ddp_no_sync(ddp) if j == k - 1 else ddp.no_sync()
            with ctx:
                loss = F.mse_loss(ddp(xb), yb) / k
                opt.backward(loss)
        opt.step()
    params, state = snapshot(model, opt)
    return dict(params=params, state=state, seed=opt.seed, estimated=estimated)


def fd_closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def train_single_fd(dtype, hvp, fused):
    model = make_mlp(dtype)
    opt = ESGD(model.parameters(), **KWARGS, seed=1000, fused=fused, hvp=hvp)
    for s in range(NUM_STEPS):
        opt.step(fd_closure(opt, model, *batch(s, dtype)))
    return snapshot(model, opt)


def train_replica_fd(rank, dtype, hvp, fused):
    """Plain DDP (no no_sync, no opt.backward): the closure's backward is DDP's. Seeds differ per rank
    before the broadcast, as in "seeds-differ"."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_mlp(dtype)
    ddp = DDP(model)
    opt = ESGD(ddp.parameters(), **KWARGS, seed=1000 + 7 * rank, fused=fused, hvp=hvp,
               process_group=dist.group.WORLD)
    estimated = []
    for s in range(NUM_STEPS):
        x, y = batch(s, dtype)
        estimated.append(opt.is_estimation_step())
        opt.step(fd_closure(opt, ddp, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]))
    params, state = snapshot(model, opt)
    return dict(params=params, state=state, seed=opt.seed, estimated=estimated)


# Sub-batch curvature (opt.step(closure, curvature_closure), or opt.backward(loss, curvature_loss=...)):
# every rank's curvature closure takes the first SUB rows of its half of the batch; one process takes
# the same rows of both halves. name -> (hvp, form).
SUB = 3
CC_SCENARIOS = {
    "cc-forward": ("finite_difference", "closure"),
    "cc-central": ("central_difference", "closure"),
    "cc-exact": ("autograd", "closure"),
    "cc-exact-curvature-loss": ("autograd", "curvature_loss"),
}
CC_TOLERANCE = {"cc-forward": 2e-7, "cc-central": 4e-10, "cc-exact": 1e-10, "cc-exact-curvature-loss": 1e-10}


def train_cc(hvp, form, fused, rank=None):
    """fp64, 25 steps; rank=None: one process on the whole batch, else a DDP replica on its half (the
    forward passes inside opt.ddp_no_sync, as the exact estimator needs)."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype = torch.float64
    model = make_mlp(dtype)
    net = model if rank is None else DDP(model)
    group = None if rank is None else dist.group.WORLD
    opt = ESGD(net.parameters(), **KWARGS, seed=1000, fused=fused, hvp=hvp, process_group=group)

    def sync():
        return contextlib.nullcontext() if rank is None else opt.ddp_no_sync(net)

    def closure_on(xb, yb):
        def closure():
            opt.zero_grad()
            with sync():
                loss = F.mse_loss(net(xb), yb)
                opt.backward(loss)
            return loss
        return closure

    for s in range(NUM_STEPS):
        x, y = batch(s, dtype)
        if rank is None:
            halves = list(zip(x.chunk(WORLD), y.chunk(WORLD)))
            xs, ys = torch.cat([h[0][:SUB] for h in halves]), torch.cat([h[1][:SUB] for h in halves])
        else:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
            xs, ys = x[:SUB], y[:SUB]
        if form == "closure":
            opt.step(closure_on(x, y), curvature_closure=closure_on(xs, ys))
        else:
            opt.zero_grad()
            with sync():
                loss = F.mse_loss(net(x), y)
                curvature_loss = F.mse_loss(net(xs), ys) if opt.is_estimation_step() else None
                opt.backward(loss, curvature_loss=curvature_loss)
            opt.step()
    params, state = snapshot(model, opt)
    return dict(params=params, state=state, seed=opt.seed, estimated=[])


def _train_all(rank, tmpdir):
    results = {}
    for fused_name, fused in FUSED.items():
        for name, (dtype, seed_of, k, _) in SCENARIOS.items():
            results[(name, fused_name)] = train_replica(rank, dtype, seed_of(rank), k, fused, STATE_DTYPE.get(name))
        for name, (dtype, hvp) in FD_SCENARIOS.items():
            results[(name, fused_name)] = train_replica_fd(rank, dtype, hvp, fused)
        for name, (hvp, form) in CC_SCENARIOS.items():
            results[(name, fused_name)] = train_cc(hvp, form, fused, rank)
    # seed=None: each rank's global RNG differs, the broadcast must still agree.
    torch.manual_seed(rank)
    results["seed-none"] = ESGD(make_mlp(torch.float32).parameters(), process_group=dist.group.WORLD).seed
    return results


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return run_ranks(_train_all, WORLD, str(tmp_path_factory.mktemp("ddp")), DDP_TIMEOUT_S)


CASES = [(name, fused_name) for fused_name in FUSED for name in SCENARIOS]
CASE_IDS = [f"{name}-{fused_name}" for name, fused_name in CASES]
FD_CASES = [(name, fused_name) for fused_name in FUSED for name in FD_SCENARIOS]
FD_CASE_IDS = [f"{name}-{fused_name}" for name, fused_name in FD_CASES]


@pytest.mark.parametrize("case", CASES + FD_CASES, ids=CASE_IDS + FD_CASE_IDS)
def test_replicas_stay_bit_identical(ddp_runs, case):
    a, b = ddp_runs[0][case], ddp_runs[1][case]
    assert a["estimated"] == b["estimated"]
    assert any(a["estimated"]) and not all(a["estimated"]), "the run must have estimation and plain steps"
    for j, (p, q) in enumerate(zip(a["params"], b["params"])):
        assert torch.equal(p, q), f"param {j} differs between ranks by {(p - q).abs().max():.3e}"
    for j, (s, t) in enumerate(zip(a["state"], b["state"])):
        assert s.keys() == t.keys()
        for key in s:
            same = torch.equal(s[key], t[key]) if torch.is_tensor(s[key]) else s[key] == t[key]
            assert same, f"state[{j}][{key!r}] differs between ranks"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_replicas_match_single_process_on_the_whole_batch(ddp_runs, case):
    name, fused_name = case
    dtype, _, _, ref_seed = SCENARIOS[name]
    params, state = train_single(dtype, ref_seed, FUSED[fused_name], STATE_DTYPE.get(name))
    got = ddp_runs[0][case]
    rtol = STATE_TOLERANCE.get(name, TOLERANCE[dtype])
    start = make_mlp(dtype)
    moved = max((p - s.detach()).abs().max() for p, s in zip(params, start.parameters()))
    assert moved > 0.05, "the run barely moved: the comparison would prove nothing"
    for j, (p, q) in enumerate(zip(got["params"], params)):
        err = (p - q).abs().max() / q.abs().max()
        assert err <= rtol, f"{case}: param {j} is {err:.3e} away from the single-process run"
    for j, (s, t) in enumerate(zip(got["state"], state)):
        assert s["step"] == t["step"] == NUM_STEPS
        assert s["estimates"] == t["estimates"]
        for key in ("exp_avg", "exp_hz_sq"):
            assert s[key].dtype == t[key].dtype == state_dtype(dtype, STATE_DTYPE.get(name))
            err = (s[key].double() - t[key].double()).abs().max() / t[key].double().abs().max()
            assert err <= 10 * rtol, f"{case}: state[{j}][{key!r}] is {err:.3e} away from the single-process run"


@pytest.mark.parametrize("case", FD_CASES, ids=FD_CASE_IDS)
def test_finite_difference_replicas_match_single_process_on_the_whole_batch(ddp_runs, case):
    name, fused_name = case
    dtype, hvp = FD_SCENARIOS[name]
    params, state = train_single_fd(dtype, hvp, FUSED[fused_name])
    got = ddp_runs[0][case]
    assert got["seed"] == 1000
    tol = FD_TOLERANCE[name]
    start = make_mlp(dtype)
    moved = max((p - s.detach()).abs().max() for p, s in zip(params, start.parameters()))
    assert moved > 0.05, "the run barely moved: the comparison would prove nothing"
    for j, (p, q) in enumerate(zip(got["params"], params)):
        err = (p - q).abs().max() / q.abs().max()
        assert err <= tol, f"{case}: param {j} is {err:.3e} away from the single-process run"
    for j, (s, t) in enumerate(zip(got["state"], state)):
        assert s["step"] == t["step"] == NUM_STEPS and s["estimates"] == t["estimates"]


CC_CASES = [(name, fused_name) for fused_name in FUSED for name in CC_SCENARIOS]


@pytest.mark.parametrize("case", CC_CASES, ids=[f"{n}-{f}" for n, f in CC_CASES])
def test_sub_batch_curvature_replicas_match_single_process(ddp_runs, case):
    """Each rank's curvature closure on its slice, averaged over the ranks (by DDP's reducer for the
    finite differences, by ESGD for the exact products), equals one process on both slices."""
    name, fused_name = case
    hvp, form = CC_SCENARIOS[name]
    reference = train_cc(hvp, form, FUSED[fused_name])
    a, b = ddp_runs[0][case], ddp_runs[1][case]
    start = make_mlp(torch.float64)
    moved = max((p - s.detach()).abs().max() for p, s in zip(reference["params"], start.parameters()))
    assert moved > 0.05, "the run barely moved: the comparison would prove nothing"
    for j, (p, q, r) in enumerate(zip(a["params"], b["params"], reference["params"])):
        assert torch.equal(p, q), f"{case}: param {j} differs between ranks"
        err = (p - r).abs().max() / r.abs().max()
        assert err <= CC_TOLERANCE[name], f"{case}: param {j} is {err:.3e} away from the single-process run"
    for j, (s, t) in enumerate(zip(a["state"], reference["state"])):
        assert s["step"] == t["step"] == NUM_STEPS and s["estimates"] == t["estimates"]
        err = (s["exp_hz_sq"] - t["exp_hz_sq"]).abs().max() / t["exp_hz_sq"].abs().max()
        assert err <= 10 * CC_TOLERANCE[name], f"{case}: state[{j}]['exp_hz_sq'] is {err:.3e} away"


def test_seed_is_broadcast_from_the_first_rank(ddp_runs):
    for fused_name in FUSED:
        case = ("seeds-differ", fused_name)
        assert ddp_runs[0][case]["seed"] == ddp_runs[1][case]["seed"] == 1000
    assert ddp_runs[0]["seed-none"] == ddp_runs[1]["seed-none"]
    # The broadcast seed is what makes the replicas agree: a different seed gives another run.
    other, _ = train_single(torch.float64, 1007, False)
    got = ddp_runs[0][("seeds-differ", "fused=False")]["params"]
    assert max((p - q).abs().max() for p, q in zip(got, other)) > 1e-6


# ------------------------------------------------------------------ sharded (FSDP-style) updates


@pytest.mark.parametrize("fused_kernel", [False, True], ids=["foreach", "fused-kernel"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=["fp32", "fp64", "bf16", "fp16"]
)
@pytest.mark.parametrize("estimate", [True, False], ids=["estimation", "plain"])
@pytest.mark.parametrize("layout", ["views", "copies"])
@pytest.mark.parametrize("state", [None, torch.bfloat16], ids=["default-state", "bf16-state"])
def test_update_of_shards_equals_update_of_the_whole(fused_kernel, dtype, estimate, layout, state):
    """The update is elementwise: 2 shards of a flat parameter (at an odd offset) update bit for bit
    like the whole tensor, as FSDP needs; with views into the flat buffers or separate shard tensors.
    bf16 state rounds with the bits of each element's index in the whole parameter (a shard passes its
    offset), so its shards round exactly as the whole does."""
    device = torch.device("cpu")
    if fused_kernel and not _extension.fused_supported(device, dtype):
        pytest.skip(f"the fused kernel does not run {dtype} on cpu")
    if state is not None and dtype == torch.float64:
        pytest.skip("float64 parameters keep float64 state")
    n, cut = 1001, 517
    gen = torch.Generator().manual_seed(7)
    sdt = state_dtype(dtype, state)

    def draw(lo, hi, dt):
        return (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)).to(dt)

    p0, g0, hz0 = draw(-2, 2, dtype), draw(-1, 1, dtype), draw(-3, 3, dtype)
    m0, d0 = draw(-0.5, 0.5, sdt), draw(0.01, 2.0, sdt)
    scalars = dict(
        beta1=0.9, beta2=0.99, v=0.7, eps=1e-3, weight_decay=0.01, step_size=0.05,
        momentum_scale=1.3, denom_scale=1.7, grad_scale_inv=2.0**-3, hz_scale_inv=2.0**-3,
    )
    # The loss scale is undone inside the update: scale g and hz by 2^3 to keep the same math.
    g0, hz0 = g0 * 8, hz0 * 8

    key = 2**40 + 12345

    def rounding(offsets):
        return dict(rounding_keys=[key] * len(offsets), rounding_offsets=offsets, rounding_step=7)

    whole = [t.clone() for t in (p0, g0, m0, d0, hz0)]
    esgd_update([whole[0]], [whole[1]], [whole[2]], [whole[3]], [whole[4]] if estimate else None,
                **scalars, fused=fused_kernel, **rounding([0]))

    if layout == "views":
        flat = [t.clone() for t in (p0, g0, m0, d0, hz0)]
        shards = [[t[:cut], t[cut:]] for t in flat]
    else:
        shards = [[t[:cut].clone(), t[cut:].clone()] for t in (p0, g0, m0, d0, hz0)]
    for r in range(2):  # each "rank" updates its own shard
        sp, sg, sm, sd, sh = (s[r] for s in shards)
        esgd_update([sp], [sg], [sm], [sd], [sh] if estimate else None, **scalars, fused=fused_kernel,
                    **rounding([(0, cut)[r]]))
    # Also the multi-tensor form: both shards in one call.
    both = [[t[:cut].clone(), t[cut:].clone()] for t in (p0, g0, m0, d0, hz0)]
    esgd_update(both[0], both[1], both[2], both[3], both[4] if estimate else None, **scalars, fused=fused_kernel,
                **rounding([0, cut]))

    for i, name in ((0, "param"), (2, "exp_avg"), (3, "exp_hz_sq")):
        for label, parts in (("per-shard", shards[i]), ("one call", both[i])):
            joined = torch.cat(parts)
            assert torch.equal(joined, whole[i]), (
                f"{label} {name} differs from the whole-tensor update at "
                f"{(joined != whole[i]).nonzero().flatten()[:8].tolist()}"
            )
    assert not torch.equal(whole[0], p0), "the update did nothing"
    if estimate:
        assert not torch.equal(whole[3], d0)
    else:
        assert torch.equal(whole[3], d0)


@pytest.fixture
def single_rank_group():
    """A one-process gloo group in this process (destroyed afterwards)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_averaged_gradients_and_hz_are_aligned_views(single_rank_group, dtype):
    """Estimation-step gradients and Hz come back as views of one all-reduce buffer; each must start
    on a 32-byte boundary, or the CUDA kernel's vector path is lost for every parameter after the first."""
    from esgd_cuda.distributed import average_over_group

    gen = torch.Generator().manual_seed(3)
    shapes = [(3,), (5, 7), (1,), (13,), (2, 2, 3)]
    params = [torch.zeros(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    hzs = [torch.randn(s, generator=gen).to(dtype) if i != 2 else None for i, s in enumerate(shapes)]
    grads[3] = None
    expected_g = [None if g is None else g.clone() for g in grads]
    expected_h = [None if h is None else h.clone() for h in hzs]
    average_over_group(params, grads, hzs, single_rank_group)
    for name, got, want in (("grads", grads, expected_g), ("hzs", hzs, expected_h)):
        for i, (g, w) in enumerate(zip(got, want)):
            if w is None:
                assert g is None, f"{name}[{i}] has no value on any rank and must stay None"
                continue
            assert g.data_ptr() % 32 == 0, f"{name}[{i}] starts at {g.data_ptr() % 32} bytes past a 32-byte boundary"
            assert g.shape == w.shape and torch.equal(g, w), f"{name}[{i}] changed in a one-rank mean"
