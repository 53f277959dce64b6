"""The CUDA multi-tensor launch plan, through the same C++ planner the CUDA host code runs.

Runs without a GPU: esgd_cuda._C.plan_launches is plain C++ in every build of the extension.
"""

import random

import pytest

from esgd_cuda import _extension

pytestmark = pytest.mark.skipif(
    _extension.DISABLED, reason="native kernels disabled by ESGD_CUDA_DISABLE_EXTENSION"
)

CHUNK = 65536


def plan(numels, chunk=CHUNK, max_tensors=36, max_blocks=320):
    from esgd_cuda import _C

    return _C.plan_launches(list(numels), chunk, max_tensors, max_blocks)


def check_plan(numels, chunk=CHUNK, max_tensors=36, max_blocks=320):
    """Every element of every tensor covered exactly once, within the launch limits."""
    launches = plan(numels, chunk, max_tensors, max_blocks)
    covered = {}  # tensor -> list of (start, stop)
    for k, launch in enumerate(launches):
        tensors, slots, chunks = launch["tensors"], launch["block_slot"], launch["block_chunk"]
        assert 0 < len(slots) <= max_blocks, f"launch {k} has {len(slots)} blocks"
        assert len(slots) == len(chunks)
        assert 0 < len(tensors) <= max_tensors, f"launch {k} has {len(tensors)} tensors"
        assert len(set(tensors)) == len(tensors), f"launch {k} lists a tensor twice"
        assert set(slots) == set(range(len(tensors))), f"launch {k} has an unused or bad slot"
        for t in tensors:
            assert numels[t] > 0, f"empty tensor {t} took a slot in launch {k}"
        for slot, c in zip(slots, chunks):
            t = tensors[slot]
            start = c * chunk
            assert 0 <= start < numels[t], f"launch {k}: chunk {c} is outside tensor {t}"
            covered.setdefault(t, []).append((start, min(start + chunk, numels[t])))
        if k > 0 and launches[k - 1]["tensors"][-1] == tensors[0]:
            # A tensor carried over from the previous launch continues where it stopped.
            prev = launches[k - 1]
            last_chunk = max(c for s, c in zip(prev["block_slot"], prev["block_chunk"])
                             if s == len(prev["tensors"]) - 1)
            assert min(c for s, c in zip(slots, chunks) if s == 0) == last_chunk + 1
    for t, n in enumerate(numels):
        ranges = sorted(covered.get(t, []))
        if n == 0:
            assert not ranges
            continue
        assert ranges, f"tensor {t} ({n} elements) is never updated"
        position = 0
        for start, stop in ranges:
            assert start == position, f"tensor {t}: gap or overlap at element {position}"
            position = stop
        assert position == n, f"tensor {t}: covered up to {position} of {n}"
    return launches


@pytest.mark.parametrize(
    "numels",
    [
        [1],
        [3],
        [CHUNK - 1],
        [CHUNK],
        [CHUNK + 1],
        [1, 3, CHUNK - 1, CHUNK, CHUNK + 1],
        [5, 0, 0],  # trailing empty tensors: the final launch must still be made
        [0, 0, 7],
        [0, 4, 0, 0, 9, 0, CHUNK, 0],  # interleaved empty tensors
        [0, 0, 0],
        [],
    ],
    ids=lambda n: ",".join(map(str, n)) or "none",
)
def test_small_cases(numels):
    launches = check_plan(numels)
    assert len(launches) == (1 if any(numels) else 0)


def test_more_tensors_than_one_launch():
    numels = [1 + (i % 5) for i in range(100)]
    launches = check_plan(numels, max_tensors=36)
    assert [len(x["tensors"]) for x in launches] == [36, 36, 28]


def test_empty_tensors_do_not_take_slots():
    numels = [0 if i % 2 else 3 for i in range(80)]  # 40 non-empty among 40 empty
    launches = check_plan(numels, max_tensors=36)
    assert [len(x["tensors"]) for x in launches] == [36, 4]


def test_tensor_spanning_several_launches():
    numels = [10, CHUNK * 700 + 3, 10]
    launches = check_plan(numels, max_blocks=320)
    assert [len(x["block_slot"]) for x in launches] == [320, 320, 63]
    assert launches[1]["tensors"] == [1]
    assert launches[2]["tensors"] == [1, 2]


def test_block_table_fills_exactly_at_tensor_end():
    numels = [CHUNK * 320, 1]
    launches = check_plan(numels, max_blocks=320)
    assert [x["tensors"] for x in launches] == [[0], [1]]


def test_tensor_table_fills_while_a_tensor_is_open():
    # The 3rd tensor fills the table but has chunks left after the block table fills.
    numels = [1, 1, CHUNK * 10]
    launches = check_plan(numels, max_tensors=3, max_blocks=6)
    assert [x["tensors"] for x in launches] == [[0, 1, 2], [2]]


def test_over_2_31_elements():
    big = 2**31 + 12345
    launches = check_plan([3, big, 0, 5])
    last = max(c for launch in launches for s, c in zip(launch["block_slot"], launch["block_chunk"])
               if launch["tensors"][s] == 1)
    assert last * CHUNK >= 2**31, "chunk offsets past 2^31 must be representable"


def test_randomized():
    rng = random.Random(0)
    for _ in range(200):
        numels = [rng.choice([0, 1, 3, CHUNK - 1, CHUNK, CHUNK + 1, rng.randrange(1, 5 * CHUNK)])
                  for _ in range(rng.randrange(0, 60))]
        check_plan(numels, max_tensors=rng.randrange(1, 40), max_blocks=rng.randrange(1, 50))


def test_shipped_limits():
    from esgd_cuda import _C

    assert _C.CHUNK_SIZE == CHUNK
    assert _C.MAX_TENSORS_HZ <= _C.MAX_TENSORS_PLAIN <= 256
    # 5 pointer lists + sizes + a byte slot and an int32 chunk per block, plus 10 doubles of
    # coefficients, must fit the 4 KB kernel parameter space (also a static_assert in the .cu).
    for lists, tensors in ((4, _C.MAX_TENSORS_PLAIN), (5, _C.MAX_TENSORS_HZ)):
        assert lists * 8 * tensors + 8 * tensors + 5 * _C.MAX_BLOCKS + 80 <= 4096
    # The finite-difference tables, 6 lists (central, or forward from sources) and 7 (central from
    # sources): the lists, sizes and step-scalar rows per tensor, slot and chunk per block, 12
    # doubles of coefficients and the 16-byte device scale (static_asserts in multi_tensor.h).
    assert _C.MAX_TENSORS_CENTRAL_SOURCES <= _C.MAX_TENSORS_CENTRAL <= _C.MAX_TENSORS_HZ
    for lists, tensors in ((6, _C.MAX_TENSORS_CENTRAL), (7, _C.MAX_TENSORS_CENTRAL_SOURCES)):
        assert (lists + 2) * 8 * tensors + 5 * _C.MAX_BLOCKS + 12 * 8 + 16 <= 4096


@pytest.mark.parametrize(
    "args, message",
    [
        (([1], 0, 36, 320), "chunk_size must be positive"),
        (([1], CHUNK, 0, 320), "max_tensors must be positive"),
        (([1], CHUNK, 36, 0), "max_blocks must be positive"),
        (([4, -1], CHUNK, 36, 320), r"numels\[1\] is negative"),
        (([2**40], 1, 36, 320), r"numels\[0\] = 1099511627776 needs more than 2\^31 chunks"),
    ],
)
def test_invalid_arguments(args, message):
    with pytest.raises(RuntimeError, match=message):
        plan(*args)
