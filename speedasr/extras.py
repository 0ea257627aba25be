"""Optional dependencies: the pip extras that add them, and one error line when one is missing.

The core install (``pip install speedasr``) trains and runs models on CPU. A few pieces need more;
each optional package is imported only where it is used, and its absence is a
``MissingExtraError`` naming the extra that installs it (``require``, ``missing_extra``):

- ``[gpu]``: triton, for the Triton attention kernels (``speedasr.kernels``; CUDA), and
  nvidia-ml-py, for ``GPUUtilizationMonitor`` (without it the monitor warns once and stays off).
- ``[demo]``: espeakng-loader, to synthesize the embedded speech corpus (``speedasr data synth``).
- ``[plots]``: matplotlib, for the PNGs of ``speedasr profile``.

pyproject.toml's ``[project.optional-dependencies]`` is what pip installs; a test checks that it
agrees with ``EXTRAS``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from speedasr.errors import UserError

EXTRAS: dict[str, tuple[str, str]] = {
    # import name: (distribution name on PyPI, the speedasr extra that installs it)
    "triton": ("triton", "gpu"),
    "pynvml": ("nvidia-ml-py", "gpu"),
    "espeakng_loader": ("espeakng-loader", "demo"),
    "matplotlib": ("matplotlib", "plots"),
}


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed. A ``UserError`` (the CLI prints its one line) and
    an ``ImportError`` (code that probes for the package keeps working)."""


def missing_extra(module: str, purpose: str) -> MissingExtraError:
    """The error for ``purpose`` (what the user asked for) lacking the optional ``module``."""
    distribution, extra = EXTRAS[module]
    return MissingExtraError(
        f"{purpose} needs {distribution}, which the core install leaves out: "
        f"pip install 'speedasr[{extra}]'"
    )


def require(module: str, purpose: str) -> ModuleType:
    """Import the optional ``module`` (a key of ``EXTRAS``), or raise ``MissingExtraError``
    naming ``purpose`` and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing_extra(module, purpose) from e
