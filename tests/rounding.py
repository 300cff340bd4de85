"""Checks of the GR-KAN ops (tests/test_rational.py, tests/test_norm_rational.py) against float64 references:
an output must be the fp32 math rounded once to its dtype."""

import torch

from kat.triton_utils import INTERPRETED

# Half an ulp relative to the value: bf16/fp16 outputs must be fp32 math rounded once to the output dtype.
HALF_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def rounding_bound(dtype, backend):
    # The Triton interpreter truncates fp32 -> bf16 casts (compiled Triton rounds to nearest even, as checked
    # by the GPU test and bench/bench_rational.py): allow a full bf16 ulp there. TRITON_INTERPRET (see
    # conftest.py) decides this for every Triton kernel alike, the fused LayerNorm ones included.
    if backend == "triton" and dtype == torch.bfloat16 and INTERPRETED:
        return 2.0**-7
    return HALF_ULP[dtype]


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def assert_rounded_close(actual, expected, dtype, backend, rtol=1e-5):
    """Each element within half an ulp of `dtype` of the fp64 value, plus fp32 math error (rtol x max)."""
    assert actual.dtype == dtype
    bound = rounding_bound(dtype, backend) * expected.abs() + rtol * expected.abs().max() + 1e-30
    excess = (actual.double() - expected).abs() - bound
    assert excess.max() <= 0, f"worst excess {excess.max().item():.3g} at {excess.argmax().item()}"
