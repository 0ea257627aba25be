"""Package discovery, the one part of the build that pyproject.toml cannot express.

Every package under ``speedasr/`` is found automatically, so a new subpackage is never left out of
the wheel. The Triton kernels live in the top-level ``kernels/`` folder but install as
``speedasr.kernels`` (``package-dir`` in pyproject.toml; a top-level import name ``kernels`` would
collide with an existing PyPI package), which a directory search cannot find under that name.
Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["speedasr", "speedasr.*"]), "speedasr.kernels"])
