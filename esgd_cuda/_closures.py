"""The closure protocol's pieces: the random numbers replayed between a step's passes, what a
finite difference hands the update (and how the parameters it perturbed are restored), and the checks
on what closures and curvature closures do.

`esgd_cuda.curvature` runs the passes; this module holds what they share with the optimizer.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .distributed import local, sum_of_squares


class RngState:
    """The CPU generator and those of the CUDA devices a step uses, as torch.utils.checkpoint saves
    them: restoring it before a pass makes its dropout masks (and any other draw) repeat exactly."""

    def __init__(self, devices: List[int]):
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(state, d)


def cuda_devices(params: List[Tensor]) -> List[int]:
    devices = {p.device.index for p in params if p.is_cuda}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    return sorted(d for d in devices if d is not None)


@dataclass
class FiniteDifference:
    """One finite-difference estimation: the loss at theta, the perturbed gradients, and per device
    the 0-dim float64 tensor by which the update scales the difference (1/h or 1/(2h)).

    `plus` is the gradient at theta + h z; `minus` the one the difference subtracts: at theta - h z
    (central), at theta on a curvature closure's function (forward, `sub_batch`), or None (forward:
    the update's own gradient at theta)."""

    loss: Any
    plus: Dict[Tensor, Optional[Tensor]]
    minus: Optional[Dict[Tensor, Optional[Tensor]]]
    hz_scale: Dict[torch.device, Tensor]
    sub_batch: bool = False
    # The parameters are left perturbed: the update reads theta from these copies (`sources`), so
    # the restore costs no pass of its own; `restore()` copies back whatever the update did not write.
    # param -> (the tensor the kernels perturbed: its local shard, the copy of theta).
    backups: Dict[Tensor, Tuple[Tensor, Tensor]] = field(default_factory=dict)
    # On a checked estimate (`check_repeat`): how far a repeated pass landed from the first,
    # relative to the difference, and the error message when that is too far.
    repeat_ratio: Optional[float] = None
    mismatch: Optional[str] = None

    def sources(self, params: List[Tensor]) -> Optional[List[Tensor]]:
        """Theta of `params` for the update, which writes them from their copies (`updated` then
        marks them restored); None, after restoring them here, if one has no copy (not perturbed)."""
        if not all(p in self.backups for p in params):
            self.restore(params)
            return None
        return [self.backups[p][1] for p in params]

    def updated(self, params: List[Tensor]) -> None:
        for p in params:
            self.backups.pop(p, None)

    def restore(self, params: Optional[List[Tensor]] = None) -> None:
        """Copies theta back into `params` (default: every parameter still perturbed)."""
        pairs = [self.backups.pop(p) for p in (list(self.backups) if params is None else params)
                 if p in self.backups]
        if pairs:
            with torch.no_grad():
                torch._foreach_copy_([v for v, _ in pairs], [b for _, b in pairs])

    def lists(self, params: List[Tensor], grads: List[Tensor]) -> Tuple[List[Tensor], Optional[List[Tensor]]]:
        """grads_plus and grads_minus for the update of `params`. On the closure's own function a
        parameter without a gradient in a perturbed pass gets its unperturbed gradient there, so its
        difference (its Hz) is zero. On a curvature closure's function a missing gradient is a zero
        gradient, and a parameter that has one in neither pass has Hz = 0."""
        if self.sub_batch:
            plus, minus = [], []
            for p, g in zip(params, grads):
                a, b = self.plus.get(p), self.minus.get(p)
                if a is None and b is None:
                    a = b = g
                plus.append(torch.zeros_like(b) if a is None else a)
                minus.append(torch.zeros_like(a) if b is None else b)
            return plus, minus
        plus = [self.plus.get(p) if self.plus.get(p) is not None else g for p, g in zip(params, grads)]
        if self.minus is None:
            return plus, None
        minus = [self.minus.get(p) if self.minus.get(p) is not None else g for p, g in zip(params, grads)]
        return plus, minus


# A repeated pass may differ from the first by this fraction of the finite difference it is part
# of (||g' - g|| / ||g(theta + h z) - g_base||) before the estimate counts as another function's. On
# deterministic hardware the two passes are bit-identical (0); nondeterministic reductions (CUDA
# atomics) differ by rounding, orders of magnitude below this. Another batch or unreplayed dropout
# puts gradient noise into both the repeat and the difference, so the ratio is about 1: measured
# 0.28-2, 0.28 under bf16 autocast with fd_step=0.1 (benchmarks/closure_check.py at d62128f;
# docs/estimators.md), hence a bound below that rather than at 1.
REPEAT_TOLERANCE = 0.2


def check_repeat(
    params: List[Tensor], plus: Dict[Tensor, Optional[Tensor]], repeat: Dict[Tensor, Optional[Tensor]],
    base: Dict[Tensor, Optional[Tensor]], losses: List[Any], name: str,
) -> Tuple[float, Optional[str]]:
    """(||g' - g|| / ||g - g_base|| of the repeated pass at theta + h z, None if it saw the function
    of the first pass, else the error message). One host sync (the comparison), on the steps that
    check."""

    def differences(a_of, b_of):
        out = []
        for p in params:
            a, b = a_of.get(p), b_of.get(p)
            if a is None and b is None:
                out.append(torch.zeros((), dtype=local(p).dtype, device=local(p).device))
            else:
                out.append((a if a is not None else torch.zeros_like(b)) - (b if b is not None else 0))
        return out

    home = local(params[0]).device
    noise = sum_of_squares(params, home, differences(repeat, plus))
    signal = sum_of_squares(params, home, differences(plus, base))
    noise, signal = (float(x) for x in torch.stack([noise, signal]).sqrt().tolist())
    ratio = noise / signal if signal > 0 else (0.0 if noise == 0 else math.inf)
    if noise <= REPEAT_TOLERANCE * signal or not (math.isfinite(noise) and math.isfinite(signal)):
        return ratio, None  # a non-finite difference is the update's to report (it poisons the parameters)
    shown = [f"{float(v):.6g}" if isinstance(v, (Tensor, float, int)) else repr(v) for v in losses]
    return ratio, (
        f"ESGD.step: the {name} computed another function when called again at the same parameters: "
        f"the gradients of two calls differ by {ratio:.3g} times the finite difference they are meant to "
        f"measure (its losses: {', '.join(shown)}). The curvature estimate would be noise. The {name} "
        "must evaluate the same batch with the same random numbers on every call of a step: draw the "
        "batch outside it (not from an iterator or a torch.Generator of your own inside it), and draw "
        "randomness such as dropout from torch's global generators, which ESGD replays between calls."
    )


def check_returned(value: Any) -> None:
    if value is None:
        raise RuntimeError(
            "ESGD.step: curvature_closure returned None. Like the closure, it runs the forward and the "
            "backward and returns the loss, e.g. def curvature_closure(): opt.zero_grad(); loss = "
            "loss_fn(model(x[:n]), y[:n]); opt.backward(loss); return loss"
        )


def check_curvature_pass(value: Any, grads: Dict[Tensor, Optional[Tensor]], *, exact: bool) -> None:
    """A curvature closure's pass must return its loss and reach the parameters: `grads` are the
    gradients its backward left. The exact estimator also accepts a loss returned without a
    backward."""
    check_returned(value)
    if any(g is not None for g in grads.values()):
        return
    if isinstance(value, Tensor) and value.requires_grad:
        if exact:
            return  # the exact estimator takes the double backward of the returned loss itself
        raise RuntimeError(
            "ESGD.step: curvature_closure returned a loss but did no backward: no parameter received a "
            "gradient. Call loss.backward() (or opt.backward(loss)) inside it, as in the closure."
        )
    raise RuntimeError(
        "ESGD.step: curvature_closure's loss does not depend on the parameters: after its backward no "
        "parameter has a gradient. It must evaluate the model (typically on a slice of the step's "
        "batch), run the backward and return the loss."
    )
