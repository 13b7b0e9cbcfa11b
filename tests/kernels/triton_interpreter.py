"""Turn on Triton's interpreter for a CPU-only test module, or skip the module.

Triton's interpreter must be on before triton is first imported (its own library
functions are jitted at import), and it is process-wide: on a GPU machine the kernels
are tested compiled instead (test_triton_gpu.py), so there the interpreter modules skip.
Call :func:`use_triton_interpreter` at the top of the module, before importing triton
or anything that imports it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch


def use_triton_interpreter() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: the triton backend is tested compiled there (test_triton_gpu.py)",
                    allow_module_level=True)
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
