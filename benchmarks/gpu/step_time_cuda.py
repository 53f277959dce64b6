"""Stage `step_time` of benchmarks/gpu_suite.sh: benchmarks/step_time.py --device cuda --rounds 1 (its `cuda`
preset: four shapes up to GPT-2's 124M parameters, fp32 and bf16, ESGD-M against Adam/AdamW) with
the suite's build. Writes benchmarks/results/step_time_cuda.{md,json}, which the suite copies to $OUT.
"""

import sys

import _stage

esgd_cuda = _stage.import_built()
sys.path.insert(0, str(_stage.ROOT / "benchmarks"))

import step_time  # noqa: E402

# One round: the GPU is the suite's alone, and the second round of the preset would cost ~40 s.
ARGV = ["--device", "cuda", "--rounds", "1", "--out", str(_stage.ROOT / "benchmarks" / "results")]


def main():
    args = step_time.parse_args(ARGV)
    for name in step_time.PRESETS["cuda"]["shapes"]:
        if name not in step_time.SHAPES:
            _stage.fail(f"the cuda preset names an unknown shape {name!r}")
    if step_time.import_esgd() is not esgd_cuda:
        _stage.fail(f"benchmarks/step_time.py imports another esgd_cuda: {step_time.import_esgd().__file__}")
    _stage.device_check(esgd_cuda, f"step_time.py {' '.join(ARGV)} (preset {args.preset or 'cuda'})")
    step_time.main(ARGV)
    return 0


if __name__ == "__main__":
    sys.exit(main())
