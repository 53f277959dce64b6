"""Multi-process tests on CPU: gloo ranks started with torch.multiprocessing, bounded in time.

`run_ranks(body, world, tmpdir, timeout)` starts `world` processes that join one gloo group (file
rendezvous in tmpdir), run `body(rank, tmpdir)` and report its (picklable) result through a file. A
rank that raises fails the caller with that rank's traceback; ranks still running at the deadline are
killed and the caller fails with "hang?".
"""

import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, body, world, tmpdir):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmpdir, 'rendezvous')}", rank=rank,
                                world_size=world)
        result = body(rank, tmpdir)
        torch.save(result, os.path.join(tmpdir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(tmpdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _errors(tmpdir, world):
    out = []
    for rank in range(world):
        path = os.path.join(tmpdir, f"rank{rank}.err")
        if os.path.exists(path):
            with open(path) as f:
                out.append(f"--- rank {rank} ---\n{f.read()}")
    return "\n".join(out)


def run_ranks(body, world, tmpdir, timeout):
    """The results of body(rank, tmpdir) on each of `world` gloo ranks, in rank order."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.spawn(_rank_main, args=(body, world, tmpdir), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                pytest.fail(f"the {world} ranks did not finish in {timeout}s (hang?)\n{_errors(tmpdir, world)}")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        pytest.fail(f"a rank failed: {exc}\n{_errors(tmpdir, world)}", pytrace=False)
    return [torch.load(os.path.join(tmpdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
