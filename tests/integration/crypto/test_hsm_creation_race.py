"""Key objects in the HSM are made once, however many processes ask at the same moment.

PKCS#11 has no "create if absent": the workers of one server that all find no key labelled L
would all generate one, and every later lookup of L then saw several objects
(``MultipleObjectsReturned``: the HSM looked unavailable for good).  Here several processes
race on a real SoftHSM2 token for the root key, a tenant key and a signing key pair; and
duplicates made on purpose (as an older version, or nodes on two hosts, could leave them) are
used in one order by every process, with nothing wrapped under any of them lost.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from sandboxsec.crypto.errors import KeyProviderUnavailableError, TenantKeyMissingError
from sandboxsec.crypto.keys import Pkcs11KeyProvider, gcm
from sandboxsec.crypto.signing import HsmEd25519Signer
from sandboxsec.crypto.tenant_keys import Pkcs11TenantKeyStore
from tests.integration.crypto.conftest import SOFTHSM_MODULE, SoftHsm
from tests.support.hsmrace import AAD, racer

pytestmark = pytest.mark.softhsm

PROCESSES = 5


def _count(provider: Pkcs11KeyProvider, label: str, cls: ObjectClass) -> int:
    return provider.run(lambda s: len(list(s.get_objects({Attribute.CLASS: cls,
                                                          Attribute.LABEL: label}))))


def test_processes_racing_make_each_key_once(softhsm: SoftHsm, tmp_path: Path) -> None:
    label = f"race-{secrets.token_hex(6)}"
    ctx = multiprocessing.get_context("spawn")  # no PKCS#11 state inherited across fork
    barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=racer, args=(softhsm.label, softhsm.pin, label,
                                              str(tmp_path / "locks"), n, barrier, out))
             for n in range(PROCESSES)]
    for p in procs:
        p.start()
    # A process that dies before reporting fails the test at the timeout, not by hanging it.
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[4] for r in results if r[4]] == []

    provider = Pkcs11KeyProvider(SOFTHSM_MODULE, softhsm.label, softhsm.pin, label,
                                 lock_dir=tmp_path / "locks")
    store = Pkcs11TenantKeyStore(provider, label)
    try:
        # 1. One object per label: the root key, the tenant key, one signing key pair.
        assert _count(provider, label, ObjectClass.SECRET_KEY) == 1
        assert _count(provider, store.label("tn_race"), ObjectClass.SECRET_KEY) == 1
        assert _count(provider, f"{label}/audit-checkpoint", ObjectClass.PRIVATE_KEY) == 1
        assert _count(provider, f"{label}/audit-checkpoint", ObjectClass.PUBLIC_KEY) == 1
        # 2. Every process wrapped under that one key, and saw the same signing key.
        for n, root_blob, tenant_blob, _, _ in results:
            assert provider.unwrap(root_blob, AAD) == bytes([n]) * 32
            assert store.unwrap("tn_race", tenant_blob, AAD) == bytes([n]) * 32
        assert len({r[3] for r in results}) == 1
    finally:
        provider.close()


def _generate_aes(session: Any, label: str) -> Any:
    return session.generate_key(KeyType.AES, 256, label=label, store=True,
                                template={Attribute.SENSITIVE: True,
                                          Attribute.EXTRACTABLE: False, Attribute.TOKEN: True})


def _wrap_with(key: Any, secret: bytes) -> bytes:
    """What a provider that chose ``key`` writes (format byte, nonce, GCM output)."""
    nonce = os.urandom(12)
    return b"\x02" + nonce + gcm(key, "encrypt", secret, nonce, AAD)


def _opens(key: Any, blob: bytes) -> bool:
    try:
        gcm(key, "decrypt", blob[13:], blob[1:13], AAD)
    except Exception:
        return False
    return True


def test_duplicate_root_keys_are_used_in_one_order_and_lose_nothing(softhsm: SoftHsm,
                                                                    tmp_path: Path) -> None:
    """Two root keys under one label: no lookup fails; every process wraps with the same
    one; what was wrapped under either still opens, also in a process that had cached the
    keys before the duplicate appeared."""
    label = f"dup-{secrets.token_hex(6)}"
    early = Pkcs11KeyProvider(SOFTHSM_MODULE, softhsm.label, softhsm.pin, label,
                              lock_dir=tmp_path)
    first_blob = early.wrap(b"a" * 32, AAD)  # makes the first key and caches it
    second = early.run(lambda s: _generate_aes(s, label))  # a second, as another host might
    first = early.run(lambda s: next(k for k in list(s.get_objects({Attribute.LABEL: label}))
                                 if _opens(k, first_blob)))
    by_second = early.run(lambda _s: _wrap_with(second, b"b" * 32))
    # 1. The process that cached one key before the other appeared opens both blobs.
    assert early.unwrap(by_second, AAD) == b"b" * 32
    assert early.unwrap(first_blob, AAD) == b"a" * 32

    # 2. Fresh processes: no MultipleObjectsReturned; they all wrap with the same key.
    chosen = []
    for _ in range(2):
        fresh = Pkcs11KeyProvider(SOFTHSM_MODULE, softhsm.label, softhsm.pin, label,
                                  lock_dir=tmp_path)
        assert fresh.has_root_key()
        fresh.check()
        blob = fresh.wrap(b"c" * 32, AAD)
        assert fresh.unwrap(first_blob, AAD) == b"a" * 32
        assert fresh.unwrap(by_second, AAD) == b"b" * 32
        chosen.append(early.run(lambda _s, b=blob: (_opens(first, b), _opens(second, b))))
        fresh.close()
    assert chosen[0] == chosen[1] and sorted(chosen[0]) == [False, True], chosen
    # 3. A blob neither key wrapped is still refused as such, not as an outage.
    from sandboxsec.crypto.errors import DecryptionFailedError

    with pytest.raises(DecryptionFailedError):
        early.unwrap(by_second[:-1] + bytes([by_second[-1] ^ 1]), AAD)
    early.close()


def test_duplicate_tenant_keys_open_what_either_wrapped(softhsm: SoftHsm,
                                                        tmp_path: Path) -> None:
    label = f"dupt-{secrets.token_hex(6)}"
    provider = Pkcs11KeyProvider(SOFTHSM_MODULE, softhsm.label, softhsm.pin, label,
                                 lock_dir=tmp_path)
    store = Pkcs11TenantKeyStore(provider, label)
    try:
        provider.wrap(b"r" * 32, AAD)  # the root key exists: a missing tenant key is just that
        with pytest.raises(TenantKeyMissingError):  # not asked to make one
            store.wrap("tn_dup", b"x" * 32, AAD, create=False)
        one = store.wrap("tn_dup", b"1" * 32, AAD, create=True)
        provider.run(lambda s: _generate_aes(s, store.label("tn_dup")))
        assert _count(provider, store.label("tn_dup"), ObjectClass.SECRET_KEY) == 2
        two = store.wrap("tn_dup", b"2" * 32, AAD, create=True)
        assert _count(provider, store.label("tn_dup"), ObjectClass.SECRET_KEY) == 2
        assert store.unwrap("tn_dup", one, AAD) == b"1" * 32
        assert store.unwrap("tn_dup", two, AAD) == b"2" * 32
        assert store.exists("tn_dup")
    finally:
        provider.close()


def test_duplicate_signing_pairs_resolve_the_same_way_or_fail_closed(
        softhsm: SoftHsm, tmp_path: Path) -> None:
    """Pairs made with a ``CKA_ID`` are told apart; every process picks the same one.  Pairs
    that cannot be paired (no ids) are an outage with a clear message, never a guess."""
    from pkcs11 import Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    label = f"dups-{secrets.token_hex(6)}"
    provider = Pkcs11KeyProvider(SOFTHSM_MODULE, softhsm.label, softhsm.pin, label,
                                 lock_dir=tmp_path)

    def extra_pair(name: str, ident: bytes | None) -> None:
        def op(s: Any) -> None:
            params = s.create_domain_parameters(
                KeyType.EC_EDWARDS,
                {Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")}, local=True)
            params.generate_keypair(store=True, label=name, id=ident,
                                    mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN)
        provider.run(op)

    try:
        a = HsmEd25519Signer(provider, f"{label}/grants")
        a.public_key()  # made, with an id
        extra_pair(f"{label}/grants", os.urandom(16))
        picks = {HsmEd25519Signer(provider, f"{label}/grants", create=False)
                 .public_key().public_bytes_raw() for _ in range(3)}
        assert len(picks) == 1
        signer = HsmEd25519Signer(provider, f"{label}/grants", create=False)
        signer.public_key().verify(signer.sign(b"m"), b"m")

        extra_pair(f"{label}/legacy", None)
        extra_pair(f"{label}/legacy", None)
        with pytest.raises(KeyProviderUnavailableError, match="cannot be paired"):
            HsmEd25519Signer(provider, f"{label}/legacy").sign(b"m")
        assert _count(provider, f"{label}/legacy", ObjectClass.PRIVATE_KEY) == 2  # not re-made
    finally:
        provider.close()


def test_a_pair_being_stored_by_another_process_is_waited_for(
        softhsm: SoftHsm, tmp_path: Path) -> None:
    """The token shows one half of a new pair before the other.  A process that looks while
    another is still storing (under the creation lock) waits for it, not calls it broken."""
    import threading
    import time

    from pkcs11 import Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    from sandboxsec.crypto.hsm_objects import CreationLock

    label = f"half-{secrets.token_hex(6)}"
    provider = Pkcs11KeyProvider(SOFTHSM_MODULE, softhsm.label, softhsm.pin, label,
                                 lock_dir=tmp_path)
    name = f"{label}/grants"

    def public_half_only(s: Any) -> None:
        # The private half is stored under another label for now: what a reader sees between
        # the two halves of another process's generate call.
        params = s.create_domain_parameters(
            KeyType.EC_EDWARDS,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")}, local=True)
        params.generate_keypair(store=True, label=name, id=os.urandom(16),
                                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                                private_template={Attribute.LABEL: f"{name}.pending"})

    def finish(s: Any) -> None:
        (priv,) = s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                 Attribute.LABEL: f"{name}.pending"})
        priv[Attribute.LABEL] = name

    # The other process: its own token session and its own hold on the lock (two opens of the
    # lock file conflict even within one process).
    maker = Pkcs11KeyProvider(SOFTHSM_MODULE, softhsm.label, softhsm.pin, label,
                              lock_dir=tmp_path)
    other = CreationLock(tmp_path, SOFTHSM_MODULE, softhsm.label)
    outcome: dict[str, Any] = {}
    try:
        with other.held():
            maker.run(public_half_only)

            def reader() -> None:
                try:
                    signer = HsmEd25519Signer(provider, name, create=False)
                    outcome["key"] = signer.public_key()
                    outcome["sig"] = signer.sign(b"m")
                except Exception as exc:  # the assertion below names it
                    outcome["error"] = exc

            thread = threading.Thread(target=reader)
            thread.start()
            time.sleep(0.3)
            assert thread.is_alive(), outcome  # waiting for the lock, not refused at once
            maker.run(finish)
        thread.join(timeout=20)
        assert "error" not in outcome, outcome
        outcome["key"].verify(outcome["sig"], b"m")
        assert _count(provider, name, ObjectClass.PRIVATE_KEY) == 1
        assert _count(provider, name, ObjectClass.PUBLIC_KEY) == 1
    finally:
        provider.close()
        maker.close()
