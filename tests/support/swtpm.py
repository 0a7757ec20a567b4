"""Booted swtpm devices for the tests against a real (software) TPM.

:func:`booted` starts a vTPM, measures a boot of ``image`` and makes its AK; the ``tpm`` and
``other_tpm`` fixtures (registered for the whole suite in ``tests/conftest.py``) give each
test module one such device, and a second machine's (its own EK, AK and keys).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxsec.sandbox import swtpm as sw

__all__ = ["IMAGE", "booted", "other_tpm", "tpm"]

#: The image the devices boot (its digest is measured into PCR 9).
IMAGE = b"sandbox image v1 " * 4096


@contextlib.contextmanager
def booted(directory: Path, image: bytes | None = IMAGE,
           banks: tuple[str, ...] | None = None) -> Iterator[sw.SwTpm]:
    """A started vTPM with an AK, booted with ``image`` (None: PCRs left at reset), closed
    at the end of the block."""
    device = sw.start_swtpm(directory, banks=banks or ("sha256",))
    try:
        if image is not None:
            device.measure_boot(image)
        device.ak()
        yield device
    finally:
        device.close()


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sw.SwTpm]:
    """One vTPM per module: manufactured, started, booted with IMAGE, with an AK."""
    with booted(tmp_path_factory.mktemp("swtpm")) as device:
        yield device


@pytest.fixture(scope="module")
def other_tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sw.SwTpm]:
    """A second machine's vTPM (its own EK, AK and keys), booted the same way."""
    with booted(tmp_path_factory.mktemp("swtpm2")) as device:
        yield device
