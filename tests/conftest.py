"""Shared test setup.

The Triton kernels are tested on CPU through the Triton interpreter, which Triton enables only if
TRITON_INTERPRET=1 is in the environment when a kernel is decorated, i.e. before kat.rational.kernels (or
anything else) imports triton. Set it here, before any test module is imported; an explicit
TRITON_INTERPRET=0 in the environment (to test the compiled kernels on a GPU) is respected.
"""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


@pytest.fixture(scope="session")
def demo_digits(tmp_path_factory):
    """copy(train, val): a new ImageFolder tree with the first `train` / `val` demo digits of each class, and
    one more val image of class 0 (an odd val count: DDP evaluation must neither pad nor drop)."""

    def copy(train: int, val: int) -> Path:
        root = tmp_path_factory.mktemp("digits")
        for split, per_class in (("train", train), ("val", val)):
            for c in range(10):
                count = per_class + (split == "val" and c == 0)
                (root / split / str(c)).mkdir(parents=True)
                for f in sorted((DEMO / split / str(c)).glob("*.png"))[:count]:
                    shutil.copy(f, root / split / str(c) / f.name)
        return root

    return copy
