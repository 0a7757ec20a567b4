"""Replays tests/vectors/image: each hostile manifest gets the reason code named in index.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sandboxsec.attestation.image import verify_manifest
from sandboxsec.attestation.trust import TrustStore, parse_revocations
from sandboxsec.errors import SandboxSecError
from tests.support.pki import NOW

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "image"
INDEX: dict[str, dict[str, str]] = json.loads((VECTORS / "index.json").read_text())


@pytest.fixture(scope="module")
def trust() -> TrustStore:
    store = TrustStore.from_pem((VECTORS / "root.pem").read_bytes())
    return store.with_revocations(parse_revocations((VECTORS / "revocations.txt").read_text()))


def test_every_vector_file_is_indexed() -> None:
    on_disk = {p.name for p in VECTORS.glob("*.dsse.json")}
    assert on_disk == set(INDEX)
    assert len(INDEX) >= 40


@pytest.mark.parametrize("name", sorted(INDEX))
def test_vector(name: str, trust: TrustStore) -> None:
    expect = INDEX[name]["expect"]
    data = (VECTORS / name).read_bytes()
    image_digest = "sha256:" + hashlib.sha256((VECTORS / "image.bin").read_bytes()).hexdigest()
    try:
        verify_manifest(data, trust, NOW, image_digest=image_digest)
    except SandboxSecError as exc:
        assert exc.reason == expect, f"{name} ({INDEX[name]['about']}): {exc}"
    else:
        assert expect == "ok", (
            f"{name} ({INDEX[name]['about']}) verified but must fail with {expect}"
        )
