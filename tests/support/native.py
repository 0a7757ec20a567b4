"""The check, shared by the tests of each optional C extension, that it was built.

An extension that failed to compile falls back silently (to pure Python, or to
``cryptography`` in the caller's thread), so a test must notice the missing build, unless it
was turned off on purpose with ``SANDBOXSEC_BUILD_NATIVE=0``.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest

__all__ = ["require_built"]


def require_built(module: ModuleType | None, name: str, implementation: str) -> None:
    """Fail unless ``module`` (named ``name``) imported and its user runs on it
    (``implementation`` is ``"native"``); skip when the build is off on purpose."""
    if os.environ.get("SANDBOXSEC_BUILD_NATIVE") == "0":
        pytest.skip("SANDBOXSEC_BUILD_NATIVE=0: the native modules are off on purpose")
    assert module is not None, (
        f"{name} did not build: install gcc, python3-dev and libssl-dev and reinstall "
        "(pip install -e .), or set SANDBOXSEC_BUILD_NATIVE=0"
    )
    assert implementation == "native"
