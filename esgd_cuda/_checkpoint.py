"""ESGD's checkpoints: what `state_dict()` adds to torch.optim's, and how `load_state_dict()` reads it.

torch.optim's state dict holds the per-parameter state and the param groups. ESGD adds its global
schedule and probe seed under the top-level key "esgd", keeps float32 state for 16-bit parameters
(torch.optim would cast it to the parameter dtype on load), and stores the step counters as the
optimizer's mode expects them (ints, or device tensors in capturable mode).
"""

from typing import List

import torch
from torch import Tensor

from ._validation import check_schedule
from .functional import state_dtype

STATE_KEYS = ("exp_avg", "exp_hz_sq")


def global_state(opt) -> dict:
    """The "esgd" entry: the step schedule, the probe seed and the counters outside per-param state."""
    return {
        "step_index": opt._step_index,
        "last_estimate": opt._last_estimate,
        "update_d_every": opt.update_d_every,
        "d_warmup": opt.d_warmup,
        "seed": opt.seed,
        "skipped_steps": opt._skipped_steps,
        "last_step_estimated": opt._last_step_estimated,
    }


def load(opt, state_dict: dict, load_base) -> None:
    """Loads `state_dict` into `opt`; `load_base` is torch.optim.Optimizer.load_state_dict."""
    if not isinstance(state_dict, dict) or "esgd" not in state_dict:
        raise ValueError("ESGD.load_state_dict: state_dict has no 'esgd' entry; it was not saved by ESGD")
    sd = dict(state_dict)
    glob = dict(sd.pop("esgd"))
    check_schedule(glob["update_d_every"], glob["d_warmup"])
    saved_state = sd.get("state", {})
    saved_ids = [i for g in sd.get("param_groups", []) for i in g["params"]]
    load_base(sd)
    for group in opt.param_groups:
        group.setdefault("maximize", False)  # checkpoints from before the option existed
    # torch.optim casts floating state to the parameter dtype; ESGD keeps float32 state for 16-bit
    # parameters, so reload those tensors from the checkpoint at full precision.
    current = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, current):
        if pid not in saved_state or p not in opt.state:
            continue
        for key in STATE_KEYS:
            value = saved_state[pid].get(key)
            if isinstance(value, Tensor):
                opt.state[p][key] = value.to(device=p.device, dtype=state_dtype(p.dtype), copy=True)
    _load_counters(opt, saved_ids, saved_state)
    opt._step_index = int(glob["step_index"])
    opt._last_estimate = None if glob["last_estimate"] is None else int(glob["last_estimate"])
    opt.update_d_every = int(glob["update_d_every"])
    opt.d_warmup = int(glob["d_warmup"])
    opt.seed = int(glob["seed"])
    opt._skipped_steps = int(glob.get("skipped_steps", 0))
    opt._last_step_estimated = bool(glob.get("last_step_estimated", False))


def _load_counters(opt, saved_ids: List[int], saved_state: dict) -> None:
    # torch.optim casts tensor state to the parameter dtype (a float16 'estimates' would stop
    # counting exactly at 2048), and checkpoints may come from the other mode: store the
    # counters as this optimizer's mode expects them.
    current = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, current):
        if pid not in saved_state or p not in opt.state:
            continue
        for key in ("step", "estimates"):
            value = saved_state[pid].get(key)
            if value is None:
                continue
            if opt.capturable:
                opt.state[p][key] = torch.as_tensor(value, dtype=torch.float32).to(p.device).clone()
            else:
                opt.state[p][key] = int(value)
