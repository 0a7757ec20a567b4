"""The local root-key provider and the key caches."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sandboxsec.crypto.envelope import DataKey
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    KeyProviderUnavailableError,
)
from sandboxsec.crypto.keyring import TtlCache, WriteLease
from sandboxsec.crypto.keys import LocalKeyProvider, Pkcs11KeyProvider, build_key_provider
from sandboxsec.settings import Settings

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_local_key_created_mode_0600(tmp_path: Path) -> None:
    provider = LocalKeyProvider(tmp_path / "home")
    wrapped = provider.wrap(b"k" * 32, b"aad")
    info = provider.path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == 32
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["root.key"]  # no leftovers
    assert provider.unwrap(wrapped, b"aad") == b"k" * 32
    assert provider.provider_id.startswith("local:")
    # The same file gives the same id; the id does not contain the key.
    assert LocalKeyProvider(tmp_path / "home").provider_id == provider.provider_id
    assert provider.path.read_bytes().hex()[:16] not in provider.provider_id


def test_local_unwrap_binds_aad_and_key(tmp_path: Path) -> None:
    a, b = LocalKeyProvider(tmp_path / "a"), LocalKeyProvider(tmp_path / "b")
    wrapped = a.wrap(b"k" * 32, b"tenant a v1")
    b.wrap(b"k" * 32, b"creates b's key")
    with pytest.raises(DecryptionFailedError):
        a.unwrap(wrapped, b"tenant a v2")
    with pytest.raises(DecryptionFailedError):
        b.unwrap(wrapped, b"tenant a v1")


def test_local_key_missing_is_unavailable(tmp_path: Path) -> None:
    # Only wrapping (making a new tenant key) may create the root key; unwrapping never does.
    provider = LocalKeyProvider(tmp_path)
    assert not provider.has_root_key()
    for call in (provider.check, lambda: provider.unwrap(b"\x01" + bytes(40), b"aad"),
                 lambda: provider.provider_id):
        with pytest.raises(KeyProviderUnavailableError) as err:
            call()
        assert err.value.reason == "key_provider_unavailable"
        assert err.value.status == 503
    assert not provider.has_root_key()
    with pytest.raises(KeyProviderUnavailableError):
        LocalKeyProvider(tmp_path, create=False).wrap(b"k" * 32, b"aad")


def test_local_key_unreadable_or_loose_is_unavailable(tmp_path: Path) -> None:
    provider = LocalKeyProvider(tmp_path)
    provider.wrap(b"k" * 32, b"aad")
    os.chmod(provider.path, 0o644)
    with pytest.raises(KeyProviderUnavailableError, match="0600"):
        provider.check()
    provider.path.write_bytes(b"short")
    os.chmod(provider.path, 0o600)
    with pytest.raises(KeyProviderUnavailableError, match="32-byte"):
        provider.check()


def test_local_key_never_replaced(tmp_path: Path) -> None:
    provider = LocalKeyProvider(tmp_path)
    provider.wrap(b"k" * 32, b"aad")
    before = provider.path.read_bytes()
    LocalKeyProvider(tmp_path).wrap(b"k" * 32, b"aad")
    assert provider.path.read_bytes() == before


def test_pkcs11_module_missing_is_unavailable(tmp_path: Path) -> None:
    provider = Pkcs11KeyProvider(str(tmp_path / "missing.so"), "t", "1234")
    with pytest.raises(KeyProviderUnavailableError):
        provider.wrap(b"k" * 32, b"aad")


def test_build_key_provider(tmp_path: Path) -> None:
    assert isinstance(build_key_provider(Settings(home=tmp_path)), LocalKeyProvider)
    hsm = build_key_provider(Settings(home=tmp_path, key_provider="pkcs11", pkcs11_pin="1"))
    assert isinstance(hsm, Pkcs11KeyProvider)
    with pytest.raises(KeyProviderUnavailableError, match="PIN"):
        build_key_provider(Settings(home=tmp_path, key_provider="pkcs11"))


def test_cache_expires_and_is_bounded() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=2, ttl_seconds=10)
    cache.put("a", 1, T0)
    assert cache.get("a", T0 + timedelta(seconds=9)) == 1
    assert cache.get("a", T0 + timedelta(seconds=10)) is None
    cache.put("a", 1, T0)
    cache.put("b", 2, T0)
    cache.get("a", T0)  # a is now the most recently used
    cache.put("c", 3, T0)
    assert cache.get("b", T0) is None and cache.get("a", T0) == 1 and len(cache) == 2
    cache.discard_where(lambda k: k == "a")
    assert cache.get("a", T0) is None


def test_disabled_cache_keeps_nothing() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=2, ttl_seconds=0)
    cache.put("a", 1, T0)
    assert cache.get("a", T0) is None


def test_write_lease_bounds_messages() -> None:
    lease = WriteLease(key=DataKey.generate(), kek_version=1, remaining=3)
    assert [lease.take() for _ in range(5)] == [True, True, True, False, False]
