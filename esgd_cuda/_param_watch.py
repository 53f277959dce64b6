"""What the optimizer watches on its parameters between steps.

- Whether a backward pass built a graph: `loss.backward(create_graph=True)` on a loss whose gradient
  does not depend on the parameters (a linear loss) leaves gradients without a graph, exactly like a
  plain `loss.backward()`; only the grad mode of the backward pass tells the two apart, and a
  post-accumulate-grad hook sees it (the autograd engine runs hooks in the pass's grad mode).
- Parameters a plain step leaves unchanged although they have gradients, because no estimation step
  has seen their gradient: a warning, since a setup that never lets an estimation step see them (a
  framework that reduces gradients in hooks, like FSDP) would otherwise train nothing, silently.
"""

import functools
import os
import sys
import warnings
import weakref
from typing import Any, Dict, List

import torch

_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def _note_graph_backward(curvature_ref, _param) -> None:
    curvature = curvature_ref()
    if curvature is not None and torch.is_grad_enabled():
        curvature.graph_backward = True


def _remove_hooks(handles: Dict[int, Any]) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()


class GraphBackwardWatch:
    """Post-accumulate-grad hooks that set `curvature.graph_backward` when a create_graph backward
    fills p.grad. They hold the estimator weakly and are removed when the watch is collected."""

    def __init__(self, curvature):
        self._note = functools.partial(_note_graph_backward, weakref.ref(curvature))
        self._handles: Dict[int, Any] = {}
        weakref.finalize(self, _remove_hooks, self._handles)

    def watch(self, param_groups: List[dict]) -> None:
        """Hooks every trainable leaf parameter not hooked yet (cheap to call again)."""
        for group in param_groups:
            for p in group["params"]:
                if id(p) not in self._handles and p.requires_grad and p.is_leaf:
                    self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._note)


def _user_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside esgd_cuda and torch (step() is wrapped by
    torch's decorators), so a warning points at, and is de-duplicated by, the caller's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def warn_unestimated(param_groups: List[dict], params: List, state) -> None:
    """Warns when a plain step leaves parameters that have gradients (`params`, gathered from
    `param_groups`) unchanged for lack of state."""
    missing = [p for p in params if not state.get(p)]
    with_grad, skipped = len(params), len(missing)
    if not skipped:
        return
    where = {id(p): f"param_groups[{i}]['params'][{j}]"
             for i, group in enumerate(param_groups) for j, p in enumerate(group["params"])}
    names = [where[id(p)] for p in missing]
    what = (f"updates none of the {with_grad} parameters that have gradients" if skipped == with_grad
            else f"leaves {skipped} of the {with_grad} parameters that have gradients unchanged")
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    warnings.warn(
        f"ESGD: this plain step {what} ({shown}): no estimation step has seen their gradient yet, so "
        "they have no curvature estimate. They start training on the next estimation step that sees "
        "one; if this persists, their gradients do not reach p.grad on estimation steps (they must be "
        "in the graph of the loss given to opt.backward, or the closure's backward must reach them).",
        stacklevel=_user_stacklevel(),
    )
