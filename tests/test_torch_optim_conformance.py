"""PyTorch's generic optimizer tests (TestOptimRenewed), run on ESGD.

Adapted from PyTorch's test/test_optim.py (class TestOptimRenewed; BSD-3-Clause, copyright the
PyTorch contributors), as stored for pytorch/pytorch at the torch 2.9-2.10 development line (the
newest copy the project could read; torch 2.14 installs torch.testing._internal but not the test
file). PyTorch's assertions are kept; what changes is how gradients reach the optimizer:

- An ESGD estimation step needs the gradient's autograd graph, so every ``loss.backward()`` of the
  original is ``optimizer.backward(loss)`` here (docs/estimators.md: The exact estimator).
- Where the original assigns ``p.grad`` by hand, estimation steps get the same gradient from
  ``optimizer.backward`` on a loss whose gradient at the current point is exactly that tensor and
  whose Hessian is the identity (`_give_grads`); plain steps keep the hand-made gradient.
- Two optimizers compared step by step get the same ``seed``: ESGD draws random probes.

The OptimizerInfo and the helpers are in tests/esgd_optim_info.py; the state_dict, hook and deepcopy
tests are in tests/test_torch_optim_conformance_state.py. Tests for torch.optim features ESGD does not have (sparse and complex parameters, foreach,
differentiable, closure-only optimizers) are left out; where ESGD deliberately differs, the test
says so in one line naming the docs/ page.
"""

import unittest
from copy import deepcopy

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau

pytest.importorskip("esgd_optim_info", reason="torch.testing._internal lacks the optimizer test helpers")

from esgd_optim_info import (  # noqa: E402
    FP16_REDUCED_PRECISION,
    TEST_MULTIGPU,
    OptimizerErrorEnum,
    TensorTracker,
    TestCase,
    _esgd_backward,
    _get_device_type,
    _get_optim_inputs_including_global_cliquey_kwargs,
    _give_grads,
    esgd_info,
    instantiate_device_type_tests,
    onlyCPU,
    onlyCUDA,
    optims,
    parametrize,
)


class TestESGDOptimRenewed(TestCase):
    """TestOptimRenewed's generic checks: the update goes the right way, composes with schedulers,
    tensor lr and param groups, the fused kernel matches pure PyTorch, state_dict round trips,
    hooks fire, and errors are raised where they should be."""

    @onlyCPU
    @optims([esgd_info])
    def test_optim_infos_do_not_specify_global_cliquey_kwargs(self, device, dtype, optim_info):
        global_cliquey_flags = ["foreach", "fused", "differentiable"]
        for optim_input in optim_info.optim_inputs_func(device=device):
            self.assertFalse(any(f for f in global_cliquey_flags if f in optim_input.kwargs))

    @optims([esgd_info])
    def test_errors(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        error_inputs = optim_info.optim_error_inputs_func(device=device, dtype=dtype)

        for error_input in error_inputs:
            optim_input = error_input.optimizer_error_input
            params, kwargs = optim_input.params, optim_input.kwargs
            if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
                if issubclass(error_input.error_type, Warning):
                    with self.assertWarnsRegex(error_input.error_type, error_input.error_regex):
                        optim_cls(params, **kwargs)
                else:
                    with self.assertRaisesRegex(error_input.error_type, error_input.error_regex):
                        optim_cls(params, **kwargs)
            elif error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
                optim = optim_cls(params, **kwargs)
                if issubclass(error_input.error_type, Warning):
                    with self.assertWarnsRegex(error_input.error_type, error_input.error_regex):
                        optim.step()
                else:
                    with self.assertRaisesRegex(error_input.error_type, error_input.error_regex):
                        optim.step()
            else:
                raise NotImplementedError(f"Unknown error type {error_input.error_on}")

    @parametrize("contiguous", [True, False])
    @parametrize("with_lrsched", [True, False])
    @optims([esgd_info], dtypes=[torch.float32])
    def test_forloop_goes_right_direction(self, device, dtype, optim_info, contiguous, with_lrsched):
        optim_cls = optim_info.optim_cls
        schedulers_constructors = optim_info.scheduler_inputs if with_lrsched else [None]

        for schedulers_constructor in schedulers_constructors:
            # with tensor LR we need fresh inputs for each scheduler
            # or mutating it will carry across iters
            optim_inputs = optim_info.optim_inputs_func(device=device)
            for optim_input in optim_inputs:
                if contiguous:
                    weight = Parameter(torch.randn((10, 5), device=device, dtype=dtype))
                    bias = Parameter(torch.randn((10), device=device, dtype=dtype))
                else:
                    weight = Parameter(torch.randn((10, 5, 2), device=device, dtype=dtype)[..., 0])
                    bias = Parameter(torch.randn((10, 2), device=device, dtype=dtype)[..., 0])
                input = torch.randn(5, device=device, dtype=dtype)

                optimizer = optim_cls([weight, bias], **optim_input.kwargs)
                schedulers = [s(optimizer) for s in (schedulers_constructor if schedulers_constructor else [])]

                def closure():
                    optimizer.zero_grad()
                    loss = (weight.mv(input) + bias).pow(2).sum()
                    _esgd_backward(optimizer, loss)
                    return loss

                initial_value = closure().item()
                for _ in range(20):
                    loss = closure()
                    optimizer.step()

                    for scheduler in schedulers:
                        if isinstance(scheduler, ReduceLROnPlateau):
                            scheduler.step(loss)
                        else:
                            scheduler.step()

                if optim_input.kwargs.get("maximize", False):
                    self.assertGreater(closure().item(), initial_value)
                else:
                    self.assertLess(closure().item(), initial_value)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    @onlyCUDA
    @unittest.skipIf(not TEST_MULTIGPU, "only one GPU detected")
    @parametrize("with_lrsched", [True, False])
    @optims([esgd_info], dtypes=[torch.float32])
    def test_forloop_goes_right_direction_multigpu(self, device, dtype, optim_info, with_lrsched):
        optim_cls = optim_info.optim_cls
        schedulers_constructors = optim_info.scheduler_inputs if with_lrsched else [None]
        for schedulers_constructor in schedulers_constructors:
            optim_inputs = optim_info.optim_inputs_func(device=device)
            for optim_input in optim_inputs:
                weight = Parameter(torch.randn((10, 5), device="cuda:0", dtype=dtype))
                bias = Parameter(torch.randn((10), device="cuda:1", dtype=dtype))
                inpt = torch.randn(5, device="cuda:0", dtype=dtype)

                optimizer = optim_cls([weight, bias], **optim_input.kwargs)
                schedulers = [s(optimizer) for s in (schedulers_constructor if schedulers_constructor else [])]

                def closure():
                    optimizer.zero_grad()
                    loss = (weight.mv(inpt).cuda(1) + bias).pow(2).sum()
                    _esgd_backward(optimizer, loss)
                    return loss

                initial_value = closure().item()
                for _ in range(20):
                    loss = optimizer.step(closure)
                    for scheduler in schedulers:
                        if isinstance(scheduler, ReduceLROnPlateau):
                            scheduler.step(loss)
                        else:
                            scheduler.step()

                if optim_input.kwargs.get("maximize", False):
                    self.assertGreater(closure().item(), initial_value)
                else:
                    self.assertLess(closure().item(), initial_value)

    @optims([esgd_info], dtypes=[torch.float32])
    def test_param_group_with_lrscheduler_goes_right_direction(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls

        for schedulers_c in optim_info.scheduler_inputs:
            weight = Parameter(torch.randn((10, 5), device=device, dtype=dtype))
            weight2 = Parameter(torch.randn((10, 5), device=device, dtype=dtype))
            inpt = torch.randn(5, device=device, dtype=dtype)

            lr = 0.01
            optimizer = optim_cls([{"params": [weight]}, {"params": [weight2], "lr": lr}])
            schedulers = [scheduler_c(optimizer) for scheduler_c in schedulers_c]

            def closure():
                optimizer.zero_grad()
                loss = (weight.mv(inpt) + weight2.mv(inpt)).pow(2).sum()
                _esgd_backward(optimizer, loss)
                return loss

            initial_value = closure().item()
            for _ in range(20):
                loss = optimizer.step(closure)
                for scheduler in schedulers:
                    if isinstance(scheduler, ReduceLROnPlateau):
                        scheduler.step(loss)
                    else:
                        scheduler.step()

            self.assertLess(closure().item(), initial_value)

    @parametrize("num_dim", [0, 1, 2])
    @optims([esgd_info], dtypes=[torch.float32])
    def test_tensor_lr(self, device, dtype, optim_info, num_dim):
        optim_cls = optim_info.optim_cls

        lr_devices = [device]
        if _get_device_type(device) != "cpu":
            lr_devices.append("cpu")

        all_optim_inputs = _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info)
        for optim_input in all_optim_inputs:
            for lr_device in lr_devices:
                weight = Parameter(torch.randn((10, 5), device=device, dtype=dtype))
                weight_c = weight.detach().clone().requires_grad_(True)
                bias = Parameter(torch.randn((10), device=device, dtype=dtype))
                bias_c = bias.detach().clone().requires_grad_(True)
                inpt = torch.randn(5, device=device, dtype=dtype)

                kwargs = dict(optim_input.kwargs)
                if "lr" in kwargs:
                    del kwargs["lr"]
                kwargs["seed"] = 7  # both optimizers draw the same probes (docs/estimators.md: The exact estimator)

                kwargs["lr"] = 1e-3
                optimizer_r = optim_cls([weight, bias], **kwargs)

                kwargs["lr"] = torch.tensor(kwargs["lr"]).reshape([1] * num_dim).to(lr_device)
                optimizer = optim_cls([weight_c, bias_c], **kwargs)

                def closure(optim, w, b, i):
                    optim.zero_grad()
                    loss = (w.mv(i) + b).pow(2).sum()
                    _esgd_backward(optim, loss)
                    return loss

                for _ in range(5):
                    closure(optimizer_r, weight, bias, inpt)
                    optimizer_r.step()
                    closure(optimizer, weight_c, bias_c, inpt)
                    optimizer.step()

                    self.assertEqual(weight, weight_c)
                    self.assertEqual(bias, bias_c)

    @optims([esgd_info], dtypes=[torch.complex64])
    def test_complex(self, device, dtype, optim_info):
        # ESGD deliberately refuses complex parameters instead of viewing them as real (docs/edge-cases.md).
        for optim_input in _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info):
            complex_params = [
                torch.randn(10, 5, device=device, dtype=dtype, requires_grad=True),
                torch.randn(10, 5, device=device, dtype=torch.float32, requires_grad=True),
            ]
            with self.assertRaisesRegex(ValueError, "complex parameters are not supported"):
                optim_info.optim_cls(complex_params, **optim_input.kwargs)

    def _compare_between(self, inputs, models, optimizers, assert_eq_kwargs=None, assert_step_dtype=None):
        if assert_eq_kwargs is None:
            assert_eq_kwargs = {}
        kIterations = 7
        tracker = TensorTracker(assert_eq_kwargs)
        for i in range(kIterations):
            state, updated_params = [], []
            if not isinstance(inputs, list):
                inputs = [inputs, inputs]
            for input, model, optimizer in zip(inputs, models, optimizers):
                optimizer.zero_grad()

                if i == 3:
                    # Freeze a layer to test if the step of this layer in 'fused' or 'foreach'
                    # is same as the step in 'forloop'.
                    model[2].requires_grad_(False)
                if i == 5:
                    # Unfreeze the layer after 2 iters.
                    model[2].requires_grad_(True)

                # Test that step behaves as expected (a no-op) when grads are set to None
                if i != 2:
                    output = model(input)
                    loss = output.sum()
                    _esgd_backward(optimizer, loss)

                optimizer.step()
                state.append(optimizer.state)
                updated_params.append(model.parameters())

            og_state, new_state = state
            for og_p, new_p in zip(updated_params[0], updated_params[1]):
                tracker.add(og_p)
                tracker.pop_check_set(new_p, self)

                # check that optimizer states are the same
                og_p_state = og_state[og_p]
                new_p_state = new_state[new_p]
                if assert_step_dtype is not None:
                    if torch.is_tensor(og_p_state.get("step", None)):
                        self.assertEqual(og_p_state["step"].dtype, assert_step_dtype)
                    if torch.is_tensor(new_p_state.get("step", None)):
                        self.assertEqual(new_p_state["step"].dtype, assert_step_dtype)
                for k in og_p_state:
                    if torch.is_tensor(og_p_state[k]):
                        tracker.add(og_p_state[k])
                        tracker.pop_check_set(new_p_state[k], self)
                    else:
                        # ESGD keeps integer counters outside capturable mode (docs/compile.md).
                        self.assertEqual(og_p_state[k], new_p_state[k])

            self.assertTrue(tracker.all_popped())

    def _test_derived_optimizers(self, device, dtype, optim_info, flag, reduced_precision=False,
                                 assert_step_dtype=None):
        assert flag == "fused"
        assert_eq_kwargs = {} if not reduced_precision else FP16_REDUCED_PRECISION

        optim_inputs = optim_info.optim_inputs_func(device=device, dtype=dtype)
        optim_cls = optim_info.optim_cls
        for optim_input in optim_inputs:
            models, optimizers = [], []
            kwargs = deepcopy(optim_input.kwargs)
            for flag_value in (False, True):
                kwargs[flag] = flag_value
                input = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype, device=device).reshape(3, 2)

                torch.manual_seed(1)
                model = torch.nn.Sequential(
                    torch.nn.Linear(2, 3),
                    torch.nn.Sigmoid(),
                    torch.nn.Linear(3, 1),
                    torch.nn.Sigmoid(),
                )
                model.to(dtype=dtype, device=device)

                # foreach/fused optimizers should be tested with a
                # zero_size tensor as its last param.
                # ref: https://github.com/pytorch/pytorch/issues/100701
                empty_param = torch.empty((), device=device, dtype=dtype, requires_grad=True)
                empty_param.grad = torch.rand_like(empty_param)
                params = list(model.parameters()) + [empty_param]

                optimizer = optim_cls(params, **kwargs)
                models.append(model)
                optimizers.append(optimizer)

            self._compare_between(input, models, optimizers, assert_eq_kwargs, assert_step_dtype)

    @optims([esgd_info], dtypes=[torch.float64, torch.float32, torch.bfloat16, torch.float16])
    def test_fused_matches_forloop(self, device, dtype, optim_info):
        if _get_device_type(device) not in optim_info.supports_fused_on:
            self.skipTest(f"{device} is not supported for fused on {optim_info.optim_cls.__name__}")
        self._test_derived_optimizers(device, dtype, optim_info, "fused")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    @onlyCUDA
    @unittest.skipIf(not TEST_MULTIGPU, "only one GPU detected")
    @optims([esgd_info])
    def test_mixed_device_dtype(self, device, dtype, optim_info):
        if "cuda" not in optim_info.supports_fused_on:
            self.skipTest(f"fused not supported for {optim_info.optim_cls.__name__} on cuda")
        params = [
            torch.rand(2, 3, dtype=torch.float64, device="cuda:0", requires_grad=True),
            torch.rand(2, 3, dtype=torch.float32, device="cuda:0", requires_grad=True),
            torch.rand(2, 3, dtype=torch.float16, device="cuda:0", requires_grad=True),
            torch.rand(2, 3, dtype=torch.bfloat16, device="cuda:0", requires_grad=True),
            torch.rand(2, 3, dtype=torch.float64, device="cuda:1", requires_grad=True),
            torch.rand(2, 3, dtype=torch.float32, device="cuda:1", requires_grad=True),
            torch.rand(2, 3, dtype=torch.float16, device="cuda:1", requires_grad=True),
            torch.rand(2, 3, dtype=torch.bfloat16, device="cuda:1", requires_grad=True),
        ]
        grads = [torch.rand_like(p) for p in params]

        optim_inputs = optim_info.optim_inputs_func(device=device)
        optim_cls = optim_info.optim_cls
        for optim_input in optim_inputs:
            updated_params, state = [], []
            kwargs = deepcopy(optim_input.kwargs)
            kwargs["seed"] = 3
            for use_impl in (False, True):
                kwargs["fused"] = use_impl
                params_clone = [p.detach().clone().requires_grad_(True) for p in params]
                optimizer = optim_cls(params_clone, **kwargs)
                for _ in range(7):
                    _give_grads(optimizer, params_clone, grads)
                    optimizer.step()

                state.append(optimizer.state)
                updated_params.append(params_clone)

            og_state, new_state = state
            for og_p, new_p in zip(updated_params[0], updated_params[1]):
                single_rtol, single_atol = torch.testing._comparison.get_tolerances(new_p.dtype, rtol=None, atol=None)
                rtol = 5 * single_rtol
                atol = 5 * single_atol

                self.assertEqual(og_p, new_p, rtol=rtol, atol=atol)

                og_p_state = og_state[og_p]
                new_p_state = new_state[new_p]

                for k in og_p_state:
                    actual = new_p_state[k]
                    self.assertEqual(og_p_state[k], actual, rtol=rtol, atol=atol)

    @optims([esgd_info], dtypes=(torch.float32,))
    def test_fused_error_on_params_on_meta(self, device, dtype, optim_info):
        if _get_device_type(device) not in optim_info.supports_fused_on:
            self.skipTest(f"{device} is not supported for fused on {optim_info.optim_cls.__name__}")

        with torch.device("meta"):
            model = torch.nn.Sequential(
                torch.nn.Linear(2, 3),
                torch.nn.Sigmoid(),
                torch.nn.Linear(3, 1),
                torch.nn.Sigmoid(),
            ).to(dtype)

        # ESGD(fused=True) refuses parameters the kernel cannot run at construction, not at step (docs/kernels.md).
        with self.assertRaisesRegex(RuntimeError, r"fused=True\): the fused kernel cannot run params\[0\]"):
            optim_info.optim_cls(model.parameters(), fused=True)

        model.to_empty(device=device)
        # to_empty leaves the memory uninitialised; a NaN there would make the estimation step's
        # gradient g + (p - p) NaN in _give_grads (CI's fresh clone once drew one), so give it values.
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-1.0, 1.0)
        optimizer = optim_info.optim_cls(model.parameters(), fused=True)
        _give_grads(optimizer, list(model.parameters()), [torch.rand_like(p) for p in model.parameters()])
        optimizer.step()

    @optims([esgd_info], dtypes=[torch.float32])
    def test_fused_does_not_step_if_foundinf(self, device, dtype, optim_info):
        # Runs on CPU too: ESGD's CPU kernel takes GradScaler's found_inf as well.
        if _get_device_type(device) not in optim_info.supports_fused_on:
            self.skipTest(f"{device} is not supported for fused on {optim_info.optim_cls.__name__}")
        optim_cls = optim_info.optim_cls
        optim_inputs = optim_info.optim_inputs_func(device=device)
        num_params = 5
        for optim_input in optim_inputs:
            for no_grad_scale in (False, True):
                params = [torch.ones((1,), device=device, dtype=dtype) for _ in range(num_params)]
                params_c = [param.detach().clone() for param in params]
                for p in params:
                    p.grad = torch.ones_like(p)
                optimizer = optim_cls(params, fused=True, **optim_input.kwargs)
                optimizer.grad_scale = None if no_grad_scale else torch.ones((1,), dtype=dtype, device=device)
                optimizer.found_inf = torch.ones((), dtype=dtype, device=device)
                optimizer.step()
                for p in params:
                    if "step" in optimizer.state[p]:
                        self.assertEqual(torch.zeros((), dtype=dtype, device=device), optimizer.state[p]["step"])
                self.assertEqual(params, params_c)

    @optims([esgd_info], dtypes=[torch.float32])
    def test_param_groups_weight_decay(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        all_optim_inputs = _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info)
        for optim_input in all_optim_inputs:
            weight_kwargs = optim_input.kwargs
            weight2_kwargs = deepcopy(optim_input.kwargs)
            weight2_kwargs["weight_decay"] = 0.0
            # fused and capturable are constructor arguments of ESGD, not param-group entries (docs/compile.md).
            outer = {k: weight_kwargs.pop(k) for k in ("fused", "capturable") if k in weight_kwargs}
            for k in outer:
                weight2_kwargs.pop(k)

            weight = Parameter(torch.randn((10, 5), device=device, dtype=dtype))
            weight2 = Parameter(torch.randn((10, 5), device=device, dtype=dtype))
            input = torch.randn(5, device=device, dtype=dtype)

            optimizer = optim_cls(
                [
                    dict(params=[weight], **weight_kwargs),
                    dict(params=[weight2], **weight2_kwargs),
                ],
                **outer,
            )

            loss = (weight.mv(input) + weight2.mv(input)).pow(2).sum()
            initial_value = loss.item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = (weight.mv(input) + weight2.mv(input)).pow(2).sum()
                _esgd_backward(optimizer, loss)
                optimizer.step()

            # Test that the direction of loss moved appropriately
            if optim_input.kwargs.get("maximize", False):
                self.assertGreater(loss.item(), initial_value)
            else:
                self.assertLess(loss.item(), initial_value)

    @optims([esgd_info], dtypes=[torch.float32])
    def test_param_groups_lr(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        all_optim_inputs = _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info)
        for optim_input in all_optim_inputs:
            # optim_input.kwargs will be the param group kwargs, which should have >0 lr
            if "lr" not in optim_input.kwargs or optim_input.kwargs["lr"] == 0:
                optim_input.kwargs["lr"] = 1e-3
            outer_kwargs = {"lr": 1e-28}
            # fused and capturable are constructor arguments of ESGD, not param-group entries (docs/compile.md).
            for k in ("fused", "capturable"):
                if k in optim_input.kwargs:
                    outer_kwargs[k] = optim_input.kwargs.pop(k)
            if isinstance(optim_input.kwargs["lr"], torch.Tensor):
                outer_kwargs["lr"] = torch.tensor(1e-28)

            weight = Parameter(torch.randn((10, 5), device=device, dtype=dtype))
            bias = Parameter(torch.randn((10), device=device, dtype=dtype))
            irrelevant = Parameter(torch.randn((2, 2), device=device, dtype=dtype))
            irrelevant_clone = irrelevant.clone()
            input = torch.randn(5, device=device, dtype=dtype)
            optimizer = optim_cls(
                [
                    dict(params=[weight, bias], **optim_input.kwargs),
                    dict(params=[irrelevant]),
                ],
                **outer_kwargs,
            )

            loss = (weight.mv(input) + bias).pow(2).sum()
            initial_value = loss.item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = (weight.mv(input) + bias).pow(2).sum()
                _esgd_backward(optimizer, loss)
                irrelevant.grad = torch.rand_like(irrelevant)
                optimizer.step()

            # Test that the direction of loss moved appropriately
            if optim_input.kwargs.get("maximize", False):
                self.assertGreater(loss.item(), initial_value)
            else:
                self.assertLess(loss.item(), initial_value)

            # Test that irrelevant parameters were not updated since lr was almost 0
            self.assertEqual(irrelevant, irrelevant_clone)

    @optims([esgd_info], dtypes=[torch.float32])
    def test_step_is_noop_when_params_have_no_grad(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        all_optim_inputs = _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info)
        params = [torch.randn(2, 3, requires_grad=False, device=device, dtype=dtype) for _ in range(2)]
        old_params = [p.clone() for p in params]

        def closure():
            return torch.tensor([1], device=device, dtype=dtype)

        for optim_input in all_optim_inputs:
            optimizer = optim_cls(params, **optim_input.kwargs)
            optimizer.step(closure)
        self.assertEqual(params, old_params)

    @optims([esgd_info], dtypes=[torch.float32])
    def test_step_is_noop_for_zero_grads(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        all_optim_inputs = _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info)
        param = torch.randn((5, 1), device=device, dtype=dtype, requires_grad=True)
        old_param = param.detach().clone()

        def closure():
            return torch.tensor([1], device=device, dtype=dtype)

        for optim_input in all_optim_inputs:
            kwargs = optim_input.kwargs

            # params will decay even if grads are empty if weight_decay != 0,
            # and capturable doesn't work for CPU tensors
            if kwargs.get("weight_decay", 0) != 0:
                continue

            params = [param]
            optimizer = optim_cls(params, **kwargs)
            _give_grads(optimizer, params, [torch.zeros_like(params[0])])
            optimizer.step(closure)
            self.assertEqual(old_param, params[0])

    @optims([esgd_info], dtypes=[torch.float32])
    def test_grads_are_never_inplaced_into(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        all_optim_inputs = _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info)
        param = torch.randn((5, 1), device=device, dtype=dtype, requires_grad=True)

        def closure():
            return torch.tensor([1], device=device, dtype=dtype)

        for optim_input in all_optim_inputs:
            params = [param]
            optimizer = optim_cls(params, **optim_input.kwargs)
            grad = torch.rand_like(params[0])

            for _ in range(5):
                _give_grads(optimizer, params, [grad])
                old_version = params[0].grad._version
                optimizer.step(closure)
                self.assertEqual(params[0].grad._version, old_version)

    @optims([esgd_info], dtypes=[torch.float32])
    def test_optimizer_can_be_printed(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        all_optim_inputs = _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info)
        params = [Parameter(torch.randn(2, 3, requires_grad=True, device=device, dtype=dtype)) for _ in range(2)]
        for optim_input in all_optim_inputs:
            optimizer = optim_cls(params, **optim_input.kwargs)
            optimizer.__repr__()

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    @onlyCUDA
    @optims([esgd_info], dtypes=[torch.float64, torch.float32, torch.bfloat16, torch.float16])
    def test_fused_cpu_matches_cuda(self, device, dtype, optim_info):
        if not {"cpu", "cuda"} <= set(optim_info.supports_fused_on):
            self.skipTest("the fused kernel is not built for both CPU and CUDA")
        optim_cls = optim_info.optim_cls
        optim_inputs = optim_info.optim_inputs_func(device="cpu")
        for optim_input in optim_inputs:
            inpts, models, optimizers = [], [], []
            for dev in ("cpu", "cuda"):
                kwargs = optim_input.kwargs
                kwargs["fused"] = True
                inpt = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype, device=dev).reshape(3, 2)

                torch.manual_seed(1)
                model = torch.nn.Sequential(
                    torch.nn.Linear(2, 3),
                    torch.nn.Sigmoid(),
                    torch.nn.Linear(3, 1),
                    torch.nn.Sigmoid(),
                )
                model.to(dtype=dtype, device=dev)

                # foreach/fused optimizers should be tested with a
                # zero_size tensor as its last param.
                # ref: https://github.com/pytorch/pytorch/issues/100701
                empty_param = torch.empty((), device=dev, dtype=dtype, requires_grad=True)
                empty_param.grad = torch.rand_like(empty_param)
                params = list(model.parameters()) + [empty_param]

                optimizer = optim_cls(params, **kwargs)
                inpts.append(inpt)
                models.append(model)
                optimizers.append(optimizer)
            self._compare_between(inpts, models, optimizers)

    @optims([esgd_info], dtypes=[torch.float32])
    def test_non_empty_state(self, device, dtype, optim_info):
        # There are internal tests that check that the state is not empty
        optim_cls = optim_info.optim_cls
        model = torch.nn.Linear(5, 5, bias=False)
        model.to(dtype=dtype, device=device)
        inpt = torch.rand(2, 5, dtype=dtype, device=device)

        for optim_input in optim_info.optim_inputs_func(device=device):
            optim = optim_cls(model.parameters(), **optim_input.kwargs)
            optim.zero_grad()
            output = model(inpt)
            loss = output.sum()
            _esgd_backward(optim, loss)
            optim.step()

            for state in optim.state.values():
                self.assertGreater(len(state), 0)


instantiate_device_type_tests(TestESGDOptimRenewed, globals(), only_for=("cpu", "cuda"))
# benchmarks/gpu_suite.sh runs the CUDA instances (pytest -m cuda); CI has no GPU to make them.
if "TestESGDOptimRenewedCUDA" in globals():
    TestESGDOptimRenewedCUDA.pytestmark = [pytest.mark.cuda]
