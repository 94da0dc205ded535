"""Test set-up: with no GPU, Triton kernels run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test
module imports `kernels`.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
