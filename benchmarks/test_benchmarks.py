"""Every impl of every op at the LLaVA-1.5 shape (B = 1, fp32) as a pytest-benchmark benchmark.

    pytest benchmarks/ --benchmark-only         # timed, grouped by op; --benchmark-json=PATH to keep the numbers
    pytest benchmarks/                          # each case once, untimed (see conftest.py)

The cases are the bench scripts' own (same inputs, same cost models in extra_info); each output is checked
against python_ref's with the script's check, so a benchmark that times a wrong computation fails.
"""

import functools

import pytest
import torch

from benchmarks import bench_info_scores, harness, run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE, BATCH, DTYPE = harness.SHAPES["llava15"], 1, "fp32"


@functools.cache
def _cases(module) -> dict:
    args = bench_info_scores.add_arguments(harness.parser("benchmarks")).parse_args([])
    cases = module.cases(SHAPE, BATCH, harness.DTYPES[DTYPE], DEVICE, args)
    return {(c.op, c.impl): c for c in cases if isinstance(c, harness.Case)}


@functools.cache
def _reference(module, op: str):
    return _cases(module)[(op, "python_ref")].fn()


PARAMS = [pytest.param(module, key, id=f"{key[0]}-{key[1]}") for module in run.MODULES for key in _cases(module)]


@pytest.mark.parametrize("module, key", PARAMS)
def test_benchmark(benchmark, module, key):
    case = _cases(module)[key]
    benchmark.group = f"{case.op} {harness.label(SHAPE, BATCH)} {DTYPE}"
    benchmark.extra_info.update(impl=case.impl, bytes=case.bytes, flops=case.flops, flop_dtype=case.flop_dtype,
                                device=harness.device_name(DEVICE))
    out = benchmark(case.fn)
    # The package's outputs against python_ref's (the baselines' own deviations are reported by the scripts).
    if case.impl in harness.PACKAGE_IMPLS and (case.op, "python_ref") in _cases(module):
        lines = module.check(SHAPE, BATCH, DTYPE, {key: out, (case.op, "python_ref"): _reference(module, case.op)})
        assert lines, "the check compared nothing"
