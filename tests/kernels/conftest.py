"""Kernel tests run the Triton kernels on CPU through the interpreter.

``TRITON_INTERPRET`` must be set before ``triton.jit`` decorates the kernels, i.e. before
``speedasr.kernels.flash_varlen`` is first imported; this conftest is loaded before the test
modules of this folder, so setting it here (at import) is early enough.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
