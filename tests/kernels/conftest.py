"""Kernel tests run the Triton kernels on CPU through the interpreter.

``TRITON_INTERPRET`` must be set before ``triton.jit`` decorates the kernels, i.e. before
``speedasr.kernels.flash_varlen_kernels`` is first imported; this conftest is loaded before the
test modules of this folder, so setting it here (at import) is early enough, unless a test module
collected earlier imported the kernels already, which is reported instead of failing obscurely.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

_kernels = sys.modules.get("speedasr.kernels.flash_varlen_kernels")
if _kernels is not None and type(_kernels.fwd_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError(
        "speedasr.kernels were imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
        "set TRITON_INTERPRET=1 in the environment (or in tests/conftest.py) to run them on CPU"
    )
