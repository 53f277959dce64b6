"""ESGD's checkpoints: what `state_dict()` adds to torch.optim's, how `load_state_dict()` reads it,
pickling, and the state initialization of torch.distributed.checkpoint.

torch.optim's state dict holds the per-parameter state and the param groups, and that is all that
torch.distributed.checkpoint (DCP) carries. So ESGD stores its global schedule and probe seed in
every param group, under the key "esgd" (checkpoints from before kept it at the top level and still
load), keeps the state in each group's `state_dtype` (torch.optim would cast it to the parameter
dtype on load): m and D are saved as they are held (float32, or bfloat16) and converted on load to
the loading optimizer's mode, bfloat16 to float32 exactly and float32 to bfloat16 by round-to-nearest
(the group's `state_dtype` is the loading optimizer's, not the checkpoint's), and stores the step
counters as the optimizer's mode expects them (ints, or device tensors in capturable mode). torch.optim's state-dict hooks run where torch.optim documents them: load
pre-hooks before ESGD reads anything, post-hooks after ESGD has finished.
"""

import contextlib
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ._validation import check_schedule
from . import _update
from .functional import state_dtype

STATE_KEYS = ("exp_avg", "exp_hz_sq")
GROUP_KEY = "esgd"
_GLOBAL_KEYS = ("step_index", "last_estimate", "update_d_every", "d_warmup", "seed", "skipped_steps",
                "last_step_estimated", "fd_estimates", "rejected_estimates")
# A pickled or deep-copied ESGD keeps its whole __dict__ except torch.optim's hook dicts (torch.optim
# does not pickle hooks either) and the parameter hooks, which __setstate__ re-creates on the copy's
# parameters.
_NOT_PICKLED = ("_graph_watch", "_ordinals")  # _ordinals: a cache keyed by object ids, rebuilt on use


def global_state(opt) -> dict:
    """The schedule, the probe seed and the counters outside per-parameter state."""
    return {
        "step_index": opt._step_index,
        "last_estimate": opt._last_estimate,
        "update_d_every": opt.update_d_every,
        "d_warmup": opt.d_warmup,
        "seed": opt.seed,
        "skipped_steps": opt._skipped_steps,
        "last_step_estimated": opt._last_step_estimated,
        "fd_estimates": opt._fd_estimates,
        "rejected_estimates": opt._rejected_estimates,
    }


@contextlib.contextmanager
def _hooks_suspended(opt, *names: str):
    """torch.optim's own state_dict/load_state_dict run these hooks at their ends; ESGD runs them
    itself once its part is done."""
    saved = {name: getattr(opt, name, None) for name in names}
    try:
        for name, hooks in saved.items():
            if hooks is not None:
                setattr(opt, name, OrderedDict())
        yield
    finally:
        for name, hooks in saved.items():
            if hooks is not None:
                setattr(opt, name, hooks)


def _hooks(opt, name: str) -> list:
    return list(getattr(opt, name, {}).values())


def state_dict(opt, base_state_dict) -> dict:
    """torch.optim's state dict with ESGD's global state in every param group; `base_state_dict` is
    torch.optim.Optimizer.state_dict. State-dict post-hooks see the finished dict."""
    with _hooks_suspended(opt, "_optimizer_state_dict_post_hooks"):
        sd = base_state_dict()
    glob = global_state(opt)
    for group in sd["param_groups"]:
        group[GROUP_KEY] = dict(glob)
    for hook in _hooks(opt, "_optimizer_state_dict_post_hooks"):
        result = hook(opt, sd)
        if result is not None:
            sd = result
    return sd


def _read_global(sd: dict) -> dict:
    groups = sd.get("param_groups", [])
    entries = [g.get(GROUP_KEY) for g in groups]
    if entries and any(e is not None for e in entries):
        for i, entry in enumerate(entries):
            if entry != entries[0]:
                raise ValueError(
                    f"ESGD.load_state_dict: param_groups[{i}]['{GROUP_KEY}'] differs from param_groups[0]'s; "
                    "the groups of one ESGD checkpoint share one schedule"
                )
        glob = dict(entries[0])
    elif isinstance(sd.get(GROUP_KEY), dict):
        glob = dict(sd[GROUP_KEY])  # checkpoints written before the schedule moved into the param groups
    else:
        raise ValueError(
            f"ESGD.load_state_dict: state_dict has no '{GROUP_KEY}' entry in its param groups (nor at the top "
            "level, where older versions kept it); it was not saved by ESGD"
        )
    missing = [k for k in ("step_index", "last_estimate", "update_d_every", "d_warmup", "seed") if k not in glob]
    if missing:
        raise ValueError(f"ESGD.load_state_dict: the '{GROUP_KEY}' entry lacks {', '.join(missing)}")
    check_schedule(glob["update_d_every"], glob["d_warmup"])
    return glob


def load(opt, state_dict: dict, load_base) -> None:
    """Loads `state_dict` into `opt`; `load_base` is torch.optim.Optimizer.load_state_dict."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"ESGD.load_state_dict: state_dict must be a dict, got {type(state_dict).__name__}")
    sd = state_dict.copy()
    for hook in _hooks(opt, "_optimizer_load_state_dict_pre_hooks"):
        result = hook(opt, sd)
        if result is not None:
            sd = result
    glob = _read_global(sd)
    sd.pop(GROUP_KEY, None)
    saved_state = sd.get("state", {})
    saved_ids = [i for g in sd.get("param_groups", []) for i in g["params"]]
    # The memory mode is the loading optimizer's: its groups keep their state_dtype.
    modes = [g.get("state_dtype") for g in opt.param_groups]
    with _hooks_suspended(opt, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
        load_base(sd)
    for group, mode in zip(opt.param_groups, modes):
        group.pop(GROUP_KEY, None)  # the schedule is the optimizer's, not a per-group setting
        group.setdefault("maximize", False)  # checkpoints from before the option existed
        group["state_dtype"] = mode
    # torch.optim casts floating state to the parameter dtype; ESGD keeps its state in the group's
    # state dtype (float32 for 16-bit parameters by default), so reload those tensors from the
    # checkpoint, converted from whatever dtype it holds them in.
    current = [(p, g) for g in opt.param_groups for p in g["params"]]
    for pid, (p, group) in zip(saved_ids, current):
        if pid not in saved_state or p not in opt.state:
            continue
        for key in STATE_KEYS:
            value = saved_state[pid].get(key)
            if isinstance(value, Tensor):
                dtype = state_dtype(p.dtype, group["state_dtype"])
                opt.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)
    _load_counters(opt, saved_ids, saved_state)
    opt._step_index = int(glob["step_index"])
    opt._last_estimate = None if glob["last_estimate"] is None else int(glob["last_estimate"])
    opt.update_d_every = int(glob["update_d_every"])
    opt.d_warmup = int(glob["d_warmup"])
    opt.seed = int(glob["seed"])
    opt._skipped_steps = int(glob.get("skipped_steps", 0))
    opt._last_step_estimated = bool(glob.get("last_step_estimated", False))
    opt._fd_estimates = int(glob.get("fd_estimates", 0))
    opt._rejected_estimates = int(glob.get("rejected_estimates", 0))
    opt._clear_pending()
    for hook in _hooks(opt, "_optimizer_load_state_dict_post_hooks"):
        hook(opt)


def _load_counters(opt, saved_ids: List[int], saved_state: dict) -> None:
    # torch.optim casts tensor state to the parameter dtype (a float16 'estimates' would stop
    # counting exactly at 2048), and checkpoints may come from the other mode: store the
    # counters as this optimizer's mode expects them. State that never took a step is a placeholder
    # from a DCP state initialization (below), equivalent to no state.
    opt._placeholders = set()
    current = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, current):
        if pid not in saved_state or p not in opt.state:
            continue
        counts = {}
        for key in ("step", "estimates"):
            value = saved_state[pid].get(key)
            if value is None:
                continue
            counts[key] = int(value)
            if opt.capturable:
                opt.state[p][key] = torch.as_tensor(value, dtype=torch.float32).to(p.device).clone()
            else:
                opt.state[p][key] = counts[key]
        if counts.get("step", 1) == 0 and counts.get("estimates", 1) == 0:
            opt._placeholders.add(p)


# ---------------------------------------------------------------- DCP's state initialization

def state_init_step(opt) -> bool:
    """Recognizes torch.distributed.checkpoint's state initialization and performs it.

    DCP (state_dict._init_optim_state) fills every gradient with zeros, sets every lr to 0 and calls
    step() without a closure, so that the optimizer creates its state. ESGD cannot estimate there
    (no graph, and no closure for a finite difference) and must not move its schedule, so it only
    creates placeholder state: zero state that has taken no step, which the next real step discards
    (a plain step must not update a parameter without an estimate). The lr test comes first and
    costs nothing on ordinary steps; the zero test reads the gradients back, on this path only.
    """
    for group in opt.param_groups:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.device.type != "cpu" or lr.item() != 0.0:  # DCP's zero lr is a CPU tensor
                return False
        elif lr != 0:
            return False
    work = opt._collect()
    grads = [g for _, gs in work for g in gs]
    if not grads or opt._curvature.hz or opt._curvature.backward_estimated:
        return False
    if any(g.requires_grad for g in grads) or any(bool(g.any()) for g in grads):
        return False
    for group, (params, _) in zip(opt.param_groups, work):
        for p in params:
            state = opt.state[p]
            if not state:
                _update.init_state(opt, p, state, group)
                opt._placeholders.add(p)
    return True


def drop_placeholders(opt) -> None:
    for p in opt._placeholders:
        opt.state.pop(p, None)
    opt._placeholders.clear()


# ---------------------------------------------------------------- pickling and deepcopy

def picklable_state(opt, base: Dict[str, Any]) -> Dict[str, Any]:
    """torch.optim pickles defaults, state and param_groups only; ESGD adds its schedule, seed,
    counters, options and any Hessian-vector products accumulated for the coming step."""
    state = {k: v for k, v in opt.__dict__.items() if not k.startswith("_optimizer_") and k not in _NOT_PICKLED}
    state.update(base)
    return state


def refuse_pickling_process_group(opt) -> None:
    if opt.process_group is not None:
        raise TypeError(
            "ESGD: an optimizer with a process_group cannot be pickled (a process group does not "
            "serialize); save opt.state_dict() and load it into an ESGD built in the new process. "
            "copy.deepcopy(opt) works and shares the process group."
        )


def deepcopy_memo(opt, memo: Optional[dict]) -> dict:
    """A deepcopy memo under which the process group is shared, not copied."""
    memo = {} if memo is None else memo
    if opt.process_group is not None:
        memo[id(opt.process_group)] = opt.process_group
    return memo
