"""capturable=True: torch.compile(fullgraph=True) of plain steps, and CUDA-graph capture of them.

Estimation steps (autograd.grad, probe generators) run eagerly; only plain steps are compiled or
captured, through `opt.plain_step()` plus `opt.count_plain_step()` on the host.
"""

import contextlib

import pytest
import torch
import torch._dynamo
from conftest import SeparableProblem, requires_cuda, run_steps
from torch._dynamo.utils import counters

from esgd_cuda import ESGD, _extension

SCHEDULE = dict(d_warmup=2, update_d_every=4, weight_decay=0.01)
NUM_STEPS = 14


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=gen, dtype=dtype)
    y = torch.randn(16, 3, generator=gen, dtype=dtype)
    return model, lambda: ((model(x) - y) ** 2).mean()


def _flat(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def _eager_trajectory(dtype, lrs):
    model, loss_fn = _model(dtype)
    opt = ESGD(model.parameters(), lr=lrs[0], **SCHEDULE)
    traj = []
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        opt.backward(loss_fn())
        opt.step()
        traj.append(_flat(model))
    return traj, opt


def _recording_backend(targets):
    """Inductor, after noting every op in the graph dynamo hands it."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes)
        return compile_fx(gm, example_inputs)

    return backend


def _compiled_trajectory(dtype, lrs, backward_inside, fused=None, targets=None):
    model, loss_fn = _model(dtype)
    lr = torch.tensor(lrs[0], dtype=torch.float64)
    opt = ESGD(model.parameters(), lr=lr, capturable=True, fused=fused, **SCHEDULE)
    backend = _recording_backend(targets if targets is not None else set())

    def train_step():
        loss = loss_fn()
        loss.backward()
        opt.plain_step()
        return loss.detach()

    compiled_train = torch.compile(train_step, fullgraph=True, backend=backend)
    compiled_update = torch.compile(opt.plain_step, fullgraph=True, backend=backend)
    traj = []
    for value in lrs:
        lr.fill_(value)  # a schedule changes the tensor in place: no recompile
        opt.zero_grad()
        if opt.should_create_graph():
            opt.backward(loss_fn())
            opt.step()
        else:
            if backward_inside:
                compiled_train()
            else:
                loss_fn().backward()
                compiled_update()
            opt.count_plain_step()
        traj.append(_flat(model))
    return traj, opt


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=str)
@pytest.mark.parametrize("backward_inside", [False, True], ids=["update-only", "fwd-bwd-update"])
@pytest.mark.parametrize("fused", [False, None], ids=["fused=False", "fused=None"])
def test_compiled_plain_steps_match_eager(dtype, rtol, backward_inside, fused):
    lrs = [0.1 * (0.95**i) for i in range(NUM_STEPS)]
    expected, eager_opt = _eager_trajectory(dtype, lrs)
    targets = set()
    # loss.backward() inside a fullgraph region needs dynamo's autograd tracing (off by default).
    if backward_inside:
        if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
            pytest.skip(f"torch {torch.__version__} has no torch._dynamo.config.trace_autograd_ops")
        tracing = torch._dynamo.config.patch(trace_autograd_ops=True)
    else:
        tracing = contextlib.nullcontext()
    with tracing:
        got, opt = _compiled_trajectory(dtype, lrs, backward_inside, fused, targets)
    # fused=None traces the native op through its fake kernel (where this torch can compile it);
    # fused=False the foreach ops.
    native = any("esgd_update_capturable_" in t for t in targets)
    expect_native = (
        fused is None and _extension.COMPILABLE and _extension.fused_supported(torch.device("cpu"), dtype)
    )
    assert native == expect_native, targets

    for step, (g, e) in enumerate(zip(got, expected)):
        scale = e.abs().max()
        assert (g - e).abs().max() <= rtol * scale, f"step {step}: compiled differs from eager"
    # The schedule advanced through the compiled steps: the estimations at steps 5, 9 and 13 ran.
    assert opt._step_index == eager_opt._step_index == NUM_STEPS
    assert opt._last_estimate == eager_opt._last_estimate == 13
    state = opt.state[next(iter(opt.state))]
    assert state["step"].item() == NUM_STEPS and state["estimates"].item() == 5
    # One graph for all ten plain steps: no graph break, no recompilation per step.
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


def test_compiling_step_is_refused():
    # A compiled step() would drop the host schedule's update (dynamo discards attribute stores in a
    # traced Optimizer.step), so it must fail loudly rather than skip estimations.
    model, loss_fn = _model()
    opt = ESGD(model.parameters(), d_warmup=0, update_d_every=100)
    opt.backward(loss_fn())
    opt.step()
    loss_fn().backward()
    # torch 2.4's dynamo cannot trace the raise inside step()'s no_grad block and refuses first, with
    # its own Unsupported error (a RuntimeError): the compiled step fails loudly all the same.
    with pytest.raises(RuntimeError, match="cannot be compiled|lasti=True while exception handling"):
        torch.compile(opt.step, fullgraph=True)()


def test_plain_step_api_errors():
    model, loss_fn = _model()
    with pytest.raises(RuntimeError, match="needs capturable=True"):
        ESGD(model.parameters()).plain_step()
    opt = ESGD(model.parameters(), capturable=True, d_warmup=1)
    loss_fn().backward()
    # The first step is step 1, as users count.
    with pytest.raises(RuntimeError, match=r"plain_step\(\): step 1 is an estimation step"):
        opt.plain_step()
    with pytest.raises(RuntimeError, match=r"count_plain_step\(\): step 1 is an estimation step"):
        opt.count_plain_step()
    with pytest.raises(ValueError, match="capturable"):
        ESGD(model.parameters(), capturable=1.0)


def test_capturable_step_matches_default_with_late_parameter():
    # Eager capturable steps (device counters, per-parameter) follow the host-counter path, also when
    # a parameter has no gradient for a while and so has fewer steps than the others.
    shapes = [(7,), (3, 5), (1,)]
    hyper = dict(lr=0.5, betas=(0.8, 0.99), v=0.5, lr_warmup=0.9, weight_decay=0.05, update_d_every=3, d_warmup=2)
    has_grad = lambda s, j: j != 1 or s >= 4  # noqa: E731
    results = []
    for capturable in (False, True):
        problem = SeparableProblem(shapes, dtype=torch.float32, seed=3)
        opt = ESGD(problem.params, capturable=capturable, **hyper)
        results.append((run_steps(opt, problem, 20, has_grad=has_grad), opt))
    (ref, ref_opt), (got, opt) = results
    for step, (a, b) in enumerate(zip(got, ref)):
        for j, (x, y) in enumerate(zip(a, b)):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-7), f"step {step} param {j}"
    for p, q in zip(opt.state, ref_opt.state):
        s = opt.state[p]
        assert s["step"].dtype == torch.float32 and s["step"].dim() == 0
        assert int(s["step"]) == ref_opt.state[q]["step"]
        assert int(s["estimates"]) == ref_opt.state[q]["estimates"]


def test_state_dict_converts_counters_between_modes():
    problem = SeparableProblem([(4,), (2, 3)], dtype=torch.float16, seed=5)
    opt = ESGD(problem.params, capturable=True, d_warmup=3)
    run_steps(opt, problem, 5)
    plain = ESGD(problem.params, capturable=False)
    plain.load_state_dict(opt.state_dict())
    for p in problem.params:
        assert plain.state[p]["step"] == 5 and isinstance(plain.state[p]["step"], int)
        assert plain.state[p]["estimates"] == 3 and isinstance(plain.state[p]["estimates"], int)
    back = ESGD(problem.params, capturable=True)
    back.load_state_dict(plain.state_dict())
    for p in problem.params:
        # float32 on the parameter's device, not the float16 torch.optim would cast state to.
        assert back.state[p]["step"].dtype == torch.float32 and back.state[p]["step"].item() == 5
        assert back.state[p]["estimates"].dtype == torch.float32


@requires_cuda
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=str)
def test_cuda_graph_replay_matches_eager(dtype, rtol):
    shapes = [(257,), (31, 9), (1,)]
    hyper = dict(lr=0.3, lr_warmup=0.9, weight_decay=0.01, update_d_every=5, d_warmup=3)
    problems = [SeparableProblem(shapes, dtype=dtype, seed=7, device="cuda") for _ in range(2)]
    ref_opt = ESGD(problems[0].params, **hyper)
    expected = run_steps(ref_opt, problems[0], 16)

    problem = problems[1]
    lr = torch.tensor(hyper.pop("lr"), device="cuda")
    opt = ESGD(problem.params, lr=lr, capturable=True, **hyper)
    graph, got = None, []
    for s in range(16):
        # Gradients must keep their addresses for the graph: zero them in place.
        opt.zero_grad(set_to_none=graph is None)
        if opt.should_create_graph():
            opt.backward(problem.loss())
            opt.step()
        else:
            problem.loss().backward()
            if graph is None:
                # Warm up the update on a side stream, as CUDA graph capture requires, then capture.
                before = [t.clone() for st in opt.state.values() for t in st.values()]
                before_p = [p.detach().clone() for p in problem.params]
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    opt.plain_step()
                torch.cuda.current_stream().wait_stream(side)
                # Undo the warm-up update so the step is applied once, by the replay below.
                for t, b in zip([t for st in opt.state.values() for t in st.values()], before):
                    t.copy_(b)
                with torch.no_grad():
                    for p, b in zip(problem.params, before_p):
                        p.copy_(b)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    opt.plain_step()  # recorded, not run
            graph.replay()
            opt.count_plain_step()
        got.append([p.detach().double().clone() for p in problem.params])
    assert graph is not None
    for step, (a, b) in enumerate(zip(got, expected)):
        for j, (x, y) in enumerate(zip(a, b)):
            assert torch.allclose(x, y, rtol=rtol, atol=rtol), f"step {step} param {j}"
