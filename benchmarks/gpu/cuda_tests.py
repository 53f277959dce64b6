"""Stage `tests` of benchmarks/gpu_suite.sh: the CUDA tests, and only those, against the suite's build.

tests/conftest.py gives every test that skips without a GPU the `cuda` marker, so `-m cuda` selects
exactly the tests CI cannot run; the rest already pass in CI. A rehearsal collects the selection
(every test module must import with this build, and the selection must not be empty) and stops at
the device check.
"""

import json
import sys

import _stage

esgd_cuda = _stage.import_built()

import pytest  # noqa: E402

print(json.dumps(esgd_cuda.extension_info(), indent=1, default=str), flush=True)

ARGS = [str(_stage.ROOT / "tests"), "-m", "cuda", "-p", "no:cacheprovider", "-q", "-ra",
        "--durations=15"]


class Selection:
    count = 0

    def pytest_collection_finish(self, session):
        Selection.count = len(session.items)


if _stage.rehearsal():
    code = pytest.main(ARGS + ["--collect-only"], plugins=[Selection()])
    if code != 0 or Selection.count == 0:
        _stage.fail(f"collecting the CUDA tests: pytest exit {int(code)}, {Selection.count} selected")
    print(f"[tests] {Selection.count} CUDA tests selected", flush=True)

_stage.device_check(esgd_cuda, "pytest -m cuda")
code = pytest.main(ARGS, plugins=[Selection()])
if Selection.count == 0:
    _stage.fail("no test carries the cuda marker")
sys.exit(int(code))
