"""Device parameters and marks shared by the kernel tests."""

import pytest
import torch

from kat.triton_utils import INTERPRETED

# With compiled kernels on CUDA the GR-KAN ops are torch.library.triton_ops (kat.rational.library.GradOp), on
# the CPU (interpreter) opaque custom ops: a test parametrised over ["cpu", CUDA_TRITON_OPS] covers both.
CUDA_TRITON_OPS = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(
            not torch.cuda.is_available() or INTERPRETED,
            reason="needs a CUDA device and TRITON_INTERPRET=0",
        ),
    ],
)

# Kernels on CPU tensors need the interpreter (conftest sets TRITON_INTERPRET=1 unless told otherwise).
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="TRITON_INTERPRET=0: the GPU tests cover the compiled kernels"
)
