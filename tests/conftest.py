"""Shared test setup.

The Triton kernels are tested on CPU through the Triton interpreter, which Triton enables only if
TRITON_INTERPRET=1 is in the environment when a kernel is decorated, i.e. before kat.rational.kernels (or
anything else) imports triton. Set it here, before any test module is imported; an explicit
TRITON_INTERPRET=0 in the environment (to test the compiled kernels on a GPU) is respected.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
