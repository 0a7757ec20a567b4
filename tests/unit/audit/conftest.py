"""Fixtures shared by the audit unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandboxsec.audit import verify


@pytest.fixture(scope="module", params=["native", "python"])
def each_verifier(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's verification tests once with the native hasher and once with the
    pure-Python pass: both must give the same verdicts and reason codes."""
    if request.param == "native" and verify.implementation() != "native":
        pytest.skip("the native hasher is not built (test_native_build says whether it must be)")
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "python":
            mp.setattr(verify, "_native", None)
        yield request.param
