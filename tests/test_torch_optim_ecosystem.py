"""ESGD with the rest of torch.optim's world: copy.deepcopy and pickle, state-dict hooks,
torch.load(weights_only=True), checkpoints of earlier versions, schedulers that cycle betas,
torch.optim.swa_utils, and torch.distributed.checkpoint (DCP) on a single-process gloo group.

Every resume check is bit for bit: a copied, reloaded or DCP-restored optimizer continues exactly as
the original does (same probes, same schedule, same state).
"""

import copy
import inspect
import io
import pickle

import pytest
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from esgd_cuda import ESGD

KWARGS = dict(lr=0.2, d_warmup=2, update_d_every=3, seed=11)
MODES = {"fused=False": {"fused": False}, "fused=None": {"fused": None}, "capturable": {"capturable": True}}


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)


def batch(step, dtype=torch.float64):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 4, generator=gen, dtype=torch.float64).to(dtype)


def train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        opt.zero_grad()
        opt.backward(model(batch(s, next(model.parameters()).dtype)).pow(2).mean())
        opt.step()


def assert_same_run(model_a, opt_a, model_b, opt_b, steps, start):
    train(model_a, opt_a, steps, start)
    train(model_b, opt_b, steps, start)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


# ------------------------------------------------------------------ deepcopy and pickle


def roundtrip(obj, how):
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_continues_like_the_original(how, mode):
    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS, **MODES[mode])
    train(model, opt, 4)
    # Mid-step: step 5 estimates, and opt.backward has already accumulated its Hz.
    opt.zero_grad()
    opt.backward(model(batch(4)).pow(2).mean())
    assert opt.should_create_graph()
    model_c, opt_c = roundtrip((model, opt), how)
    assert {k for k in vars(opt) if not k.startswith("_")} == {k for k in vars(opt_c) if not k.startswith("_")}
    assert opt_c.param_groups[0]["params"][0] is next(model_c.parameters())
    for p, p_c in zip(model.parameters(), model_c.parameters()):
        p_c.grad = p.grad.clone()  # a copied Parameter drops its .grad; the optimizer's Hz must survive
    opt.step()
    opt_c.step()
    assert_same_run(model, opt, model_c, opt_c, 6, start=5)
    assert opt_c.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    opt_c.zero_grad()  # failed before: the copy had no pending-Hz attributes


def test_copy_does_not_share_state_with_the_original():
    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS)
    train(model, opt, 3)
    model_c, opt_c = copy.deepcopy((model, opt))
    p, p_c = next(model.parameters()), next(model_c.parameters())
    opt_c.state[p_c]["exp_avg"].add_(1.0)
    assert not torch.equal(opt.state[p]["exp_avg"], opt_c.state[p_c]["exp_avg"])


def test_copied_optimizer_watches_its_own_parameters():
    """The create_graph-backward hooks follow the copy: a linear loss's manual backward works there."""
    model = torch.nn.Linear(3, 2).double()
    opt = ESGD(model.parameters(), d_warmup=4)
    model_c, opt_c = copy.deepcopy((model, opt))
    model_c(torch.randn(4, 3, dtype=torch.float64)).sum().backward(create_graph=opt_c.should_create_graph())
    opt_c.step()
    assert opt_c.state[model_c.weight]["estimates"] == 1


# ------------------------------------------------------------------ state-dict hooks


def test_load_pre_hook_result_is_what_gets_loaded():
    model = make_model(torch.bfloat16)  # 16-bit parameters: ESGD re-reads their float32 state itself
    opt = ESGD(model.parameters(), **KWARGS)
    train(model, opt, 3)
    sd = opt.state_dict()

    def pre_hook(optimizer, state_dict):
        changed = copy.deepcopy(state_dict)
        changed["state"][0]["exp_avg"].fill_(0.125)
        changed["state"][0]["step"] = 7
        for group in changed["param_groups"]:
            group["esgd"]["step_index"] = 40
        return changed

    opt.register_load_state_dict_pre_hook(pre_hook)
    opt.load_state_dict(sd)
    p = next(model.parameters())
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.all(opt.state[p]["exp_avg"] == 0.125)
    assert opt.state[p]["step"] == 7
    assert opt.state_dict()["param_groups"][0]["esgd"]["step_index"] == 40


def test_load_post_hook_changes_are_kept():
    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS)
    train(model, opt, 3)
    p = next(model.parameters())

    def post_hook(optimizer):
        optimizer.state[p]["exp_avg"] = torch.full_like(p, 3.0)
        optimizer.state[p]["step"] = 9
        optimizer.seed = 1234

    opt.register_load_state_dict_post_hook(post_hook)
    opt.load_state_dict(opt.state_dict())
    assert torch.all(opt.state[p]["exp_avg"] == 3.0) and opt.state[p]["step"] == 9
    assert opt.seed == 1234


def test_state_dict_post_hook_sees_and_edits_the_finished_dict():
    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS)
    seen = []

    def post_hook(optimizer, state_dict):
        seen.append([dict(g["esgd"]) for g in state_dict["param_groups"]])
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["esgd"]["seed"] = 5
        return state_dict

    opt.register_state_dict_post_hook(post_hook)
    sd = opt.state_dict()
    assert seen and seen[0][0]["seed"] == 11
    assert sd["param_groups"][0]["esgd"]["seed"] == 5


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("mode", MODES)
def test_weights_only_checkpoint_resumes_bit_identically(mode):
    model = make_model(torch.bfloat16)
    opt = ESGD(model.parameters(), **KWARGS, **MODES[mode])
    train(model, opt, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model_b = make_model(torch.bfloat16, seed=1)
    model_b.load_state_dict(ckpt["model"])
    opt_b = ESGD(model_b.parameters(), **{**KWARGS, "seed": 99}, **MODES[mode])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.seed == 11
    assert_same_run(model, opt, model_b, opt_b, 6, start=4)


def old_format(sd):
    """A state dict as versions before issue 11 wrote it: the schedule at the top level only."""
    sd = copy.deepcopy(sd)
    entries = [g.pop("esgd") for g in sd["param_groups"]]
    sd["esgd"] = entries[0]
    return sd


def test_checkpoint_with_top_level_esgd_entry_still_loads():
    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS)
    train(model, opt, 4)
    old = old_format(opt.state_dict())
    assert all("esgd" not in g for g in old["param_groups"]) and old["esgd"]["step_index"] == 4
    model_b = copy.deepcopy(model)
    opt_b = ESGD(model_b.parameters(), **{**KWARGS, "seed": 1})
    opt_b.load_state_dict(old)
    assert all("esgd" not in g for g in opt_b.param_groups)
    assert_same_run(model, opt, model_b, opt_b, 6, start=4)


def test_state_dict_without_schedule_is_refused():
    model = make_model()
    opt = ESGD(model.parameters())
    adam_sd = torch.optim.Adam(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="no 'esgd' entry"):
        opt.load_state_dict(adam_sd)


def test_groups_with_different_schedules_are_refused():
    model = make_model()
    opt = ESGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], **KWARGS)
    sd = opt.state_dict()
    sd["param_groups"][1]["esgd"]["step_index"] = 3
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['esgd'\] differs"):
        opt.load_state_dict(sd)


# ------------------------------------------------------------------ schedulers that cycle betas


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: OneCycleLR(opt, max_lr=0.5, total_steps=12),
        lambda opt: CyclicLR(opt, base_lr=0.05, max_lr=0.5, step_size_up=3, cycle_momentum=True,
                             base_momentum=0.8, max_momentum=0.95),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
def test_scheduler_cycling_betas_drives_the_update(make_scheduler):
    """The update uses the betas the scheduler sets: a twin given the same lr and betas by hand
    matches bit for bit, one given the same lr with fixed betas does not."""
    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS)
    scheduler = make_scheduler(opt)
    twins = [copy.deepcopy(model), copy.deepcopy(model)]
    twin_opts = [ESGD(m.parameters(), **KWARGS) for m in twins]
    seen = []
    for s in range(10):
        group = opt.param_groups[0]
        seen.append(group["betas"])
        twin_opts[0].param_groups[0]["betas"] = group["betas"]
        for o in twin_opts:
            o.param_groups[0]["lr"] = group["lr"]
        for m, o in ((model, opt), *zip(twins, twin_opts)):
            train(m, o, 1, start=s)
        scheduler.step()
    assert len({b[0] for b in seen}) > 3 and {b[1] for b in seen} == {0.999}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twins[0].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), twins[1].parameters()))


# ------------------------------------------------------------------ torch.optim.swa_utils


def test_swa_with_esgd():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2)).double()
    opt = ESGD(model.parameters(), **KWARGS)
    swa_model = AveragedModel(model)
    swa_scheduler = SWALR(opt, swa_lr=0.05, anneal_epochs=3, anneal_strategy="linear")
    snapshots = []
    for s in range(8):
        train(model, opt, 1, start=s)
        if s >= 3:
            swa_model.update_parameters(model)
            snapshots.append([p.detach().clone() for p in model.parameters()])
            swa_scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    for j, p in enumerate(swa_model.module.parameters()):
        torch.testing.assert_close(p, torch.stack([snap[j] for snap in snapshots]).mean(0), rtol=1e-12, atol=1e-14)
    loader = [batch(s) for s in range(3)]
    update_bn(loader, swa_model)
    bn = swa_model.module[1]
    assert bn.num_batches_tracked == 3 and torch.isfinite(bn.running_var).all()


# ------------------------------------------------------------------ torch.distributed.checkpoint

dcp_state = pytest.importorskip("torch.distributed.checkpoint.state_dict")


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already initialized")
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _hvp_modes():
    """Every curvature-estimator mode the constructor offers: DCP's init step must work in all."""
    modes = dict(MODES)
    if "hvp" in inspect.signature(ESGD).parameters:
        for hvp in ("finite_difference", "central_difference"):
            modes[hvp] = {"hvp": hvp}
    return modes


@pytest.mark.parametrize("mode", _hvp_modes())
def test_dcp_state_initialization_changes_nothing(gloo, mode):
    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS, **_hvp_modes()[mode])
    before = [p.detach().clone() for p in model.parameters()]
    osd = dcp_state.get_optimizer_state_dict(model, opt)  # runs DCP's zero-grad, lr-0 step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.is_estimation_step() and opt.state_dict()["param_groups"][0]["esgd"]["step_index"] == 0
    assert [g["lr"] for g in opt.param_groups] == [KWARGS["lr"]]
    assert len(osd["state"]) == len(before), "DCP expects state for every parameter"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_dcp_roundtrip_resumes_bit_identically(gloo, mode):
    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS, **MODES[mode])
    train(model, opt, 5)
    osd = dcp_state.get_optimizer_state_dict(model, opt)
    assert "esgd" not in osd, "DCP keeps only state and param_groups"
    assert all(g["esgd"]["step_index"] == 5 for g in osd["param_groups"])
    msd = dcp_state.get_model_state_dict(model)

    model_b = make_model(seed=3)
    opt_b = ESGD(model_b.parameters(), **{**KWARGS, "seed": 99}, **MODES[mode])
    dcp_state.set_model_state_dict(model_b, copy.deepcopy(msd))
    dcp_state.set_optimizer_state_dict(model_b, opt_b, copy.deepcopy(osd))
    assert opt_b.seed == 11 and not any("esgd" in g for g in opt_b.param_groups)
    assert_same_run(model, opt, model_b, opt_b, 7, start=5)


def test_dcp_save_and_load_through_the_filesystem(gloo, tmp_path):
    import torch.distributed.checkpoint as dcp

    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS)
    train(model, opt, 4)
    dcp.save({"model": dcp_state.get_model_state_dict(model), "optim": dcp_state.get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(tmp_path / "ckpt"))

    model_b = make_model(seed=3)
    opt_b = ESGD(model_b.parameters(), **{**KWARGS, "seed": 99})
    # A fresh optimizer's state dict is DCP's template: its init step creates the state entries.
    state = {"model": dcp_state.get_model_state_dict(model_b), "optim": dcp_state.get_optimizer_state_dict(model_b, opt_b)}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    dcp_state.set_model_state_dict(model_b, state["model"])
    dcp_state.set_optimizer_state_dict(model_b, opt_b, state["optim"])
    assert_same_run(model, opt, model_b, opt_b, 6, start=4)


def test_placeholder_state_from_dcp_is_dropped_by_the_next_step(gloo):
    """After DCP's init step, training is exactly that of a fresh optimizer, including a parameter
    that first gets a gradient on a plain step (its placeholder state must not be updated)."""
    a, b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    module = torch.nn.Module()
    module.a, module.b = a, b
    twin = copy.deepcopy(module)
    runs = []
    for mod, use_dcp in ((module, True), (twin, False)):
        opt = ESGD([mod.a, mod.b], lr=0.1, d_warmup=1, update_d_every=4, seed=2)
        if use_dcp:
            dcp_state.get_optimizer_state_dict(mod, opt)
            assert len(opt.state) == 2
        opt.backward(mod.a.pow(4).sum())  # step 0 estimates; b has no gradient
        opt.step()
        assert mod.b not in opt.state
        opt.zero_grad()
        opt.backward((mod.a.pow(4) + mod.b.pow(4)).sum())
        with pytest.warns(UserWarning, match="leaves 1 of the 2 parameters"):
            opt.step()  # plain step: b has no estimate and stays put
        runs.append([mod.a.detach().clone(), mod.b.detach().clone()])
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    assert torch.isfinite(runs[0][1]).all()


def test_optimizer_with_a_process_group_deep_copies_but_does_not_pickle(gloo):
    model = make_model()
    opt = ESGD(model.parameters(), **KWARGS, process_group=gloo)
    train(model, opt, 2)
    model_c, opt_c = copy.deepcopy((model, opt))
    assert opt_c.process_group is gloo
    assert_same_run(model, opt, model_c, opt_c, 3, start=2)
    with pytest.raises(TypeError, match="process_group cannot be pickled"):
        pickle.dumps(opt)


# ------------------------------------------------------------------ sharded parameters


def test_dtensor_parameters_need_a_finite_difference_estimator(gloo):
    """The exact estimator would never see a gradient of an FSDP2 model (see docs/distributed.md: Sharded training
    (FSDP2)); it refuses sharded parameters, naming the estimator that works. tests/test_fsdp.py trains them."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard")
    model = make_model()
    fully_shard(model)
    with pytest.raises(ValueError, match=r"params\[0\] in param_groups\[0\] is a DTensor .*hvp='finite_difference'"):
        ESGD(model.parameters())
    opt = ESGD([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match=r"params\[0\] in param_groups\[1\] is a DTensor"):
        opt.add_param_group({"params": list(model.parameters())})
    assert len(opt.param_groups) == 1
    ESGD(model.parameters(), hvp="finite_difference")
