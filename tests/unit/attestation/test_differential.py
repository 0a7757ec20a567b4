"""Differential tests: our standard-format code against independent implementations.

* KDFa, KDFe and MakeCredential against tpm2-pytss (``tpm2_pytss.internal.crypto`` and
  ``tpm2_pytss.utils.make_credential``);
* ``params_hash``'s canonical JSON against the ``rfc8785`` package;
* event-log replay against ``tpm2_eventlog`` (tpm2-tools) on logs these tests produce.

Disagreements that are deliberate are asserted as such, each with its reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxsec.attestation import akbind
from sandboxsec.attestation.eventlog import EventLogBuilder, replay_bytes
from sandboxsec.policy.canonical import MAX_SAFE_INTEGER, canonical_json
from sandboxsec.policy.errors import ParamsNotCanonicalError, ParamsTooLargeError

tpm2_crypto = pytest.importorskip("tpm2_pytss.internal.crypto")
from tpm2_pytss.constants import TPM2_ALG  # noqa: E402
from tpm2_pytss.types import TPM2B_PUBLIC  # noqa: E402

_ALG = {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}


# -- KDFa / KDFe ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    hash_alg=st.sampled_from(["sha256", "sha384"]),
    key=st.binary(min_size=1, max_size=64),
    label=st.sampled_from([b"STORAGE", b"INTEGRITY", b"IDENTITY", b"", b"x" * 40]),
    context_u=st.binary(max_size=70),
    context_v=st.binary(max_size=70),
    size=st.integers(min_value=1, max_value=128),
)
def test_kdfa_matches_tpm2_pytss(hash_alg: str, key: bytes, label: bytes, context_u: bytes,
                                 context_v: bytes, size: int) -> None:
    ours = akbind.kdfa(hash_alg, key, label, context_u, context_v, size * 8)
    theirs = tpm2_crypto._kdfa(_ALG[hash_alg], key, label, context_u, context_v, size * 8)
    assert ours == theirs


@settings(max_examples=150, deadline=None)
@given(
    hash_alg=st.sampled_from(["sha256", "sha384"]),
    z=st.binary(min_size=1, max_size=66),
    label=st.sampled_from([b"IDENTITY", b"DUPLICATE", b"SECRET", b""]),
    party_u=st.binary(max_size=66),
    party_v=st.binary(max_size=66),
    size=st.integers(min_value=1, max_value=128),
)
def test_kdfe_matches_tpm2_pytss(hash_alg: str, z: bytes, label: bytes, party_u: bytes,
                                 party_v: bytes, size: int) -> None:
    ours = akbind.kdfe(hash_alg, z, label, party_u, party_v, size * 8)
    # tpm2-pytss takes the label with its terminating NUL; ours appends it.
    theirs = tpm2_crypto.kdfe(_ALG[hash_alg], z, label + b"\x00", party_u, party_v, size * 8)
    assert ours == theirs


# -- MakeCredential ------------------------------------------------------------------------------

_RSA = rsa.generate_private_key(65537, 2048)
_P256 = ec.generate_private_key(ec.SECP256R1())
_P384 = ec.generate_private_key(ec.SECP384R1())


@pytest.mark.parametrize(
    ("key", "template"),
    [(_RSA, "rsa2048:aes128cfb"), (_P256, "ecc256:aes128cfb"), (_P384, "ecc384:aes256cfb")],
    ids=["rsa2048", "p256", "p384"],
)
def test_make_credential_matches_tpm2_pytss(key: Any, template: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed in, same TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET out.

    The seed is the one random input of both; it is fixed here so the outputs compare.
    """
    import tpm2_pytss.utils as tpm2_utils
    from cryptography.hazmat.primitives import serialization

    name_alg = "sha384" if template.startswith("ecc384") else "sha256"
    public_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    tpm_public = TPM2B_PUBLIC.from_pem(public_der, nameAlg=_ALG[name_alg],
                                       symmetric=template.split(":")[1])
    profile = akbind.EkProfile(key=key.public_key(), name_alg=name_alg,
                               sym_bits=256 if "aes256" in template else 128)
    ak_name = bytes.fromhex("000b") + bytes(range(32))
    credential = bytes(range(1, 33))
    seed = bytes(range(100, 100 + (48 if name_alg == "sha384" else 32)))
    encrypted_seed = b"opaque encrypted seed"
    monkeypatch.setattr(tpm2_utils, "_generate_seed", lambda *_: (seed, encrypted_seed))
    blob, secret = tpm2_utils.make_credential(tpm_public, credential, ak_name)
    ours = akbind.protect_credential(profile, ak_name, credential, seed, encrypted_seed)
    assert ours.credential_blob == blob.marshal()
    assert ours.encrypted_secret == secret.marshal()


# -- canonical JSON against rfc8785 --------------------------------------------------------------

_SAFE_INT = st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
_JSON = st.recursive(
    st.none() | st.booleans() | _SAFE_INT | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.dictionaries(st.text(max_size=8), _JSON, max_size=6))
def test_canonical_json_matches_rfc8785(value: dict[str, Any]) -> None:
    try:
        ours = canonical_json(value)
    except (ParamsNotCanonicalError, ParamsTooLargeError):
        # Refused on our side: lone surrogates (which JCS cannot encode either), depth, size.
        with pytest.raises(Exception):  # noqa: B017 - any refusal of rfc8785 will do
            rfc8785.dumps(value)
            if _depth(value) <= 16 and len(rfc8785.dumps(value)) <= 16 * 1024:
                raise
        return
    assert ours == rfc8785.dumps(value)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_floats_are_a_deliberate_refusal() -> None:
    """JCS spells 1.0 as 1; we refuse floats so an amount never passes through binary."""
    assert rfc8785.dumps({"amount": 1.0}) == b'{"amount":1}'
    with pytest.raises(ParamsNotCanonicalError):
        canonical_json({"amount": 1.0})


# -- event-log replay against tpm2_eventlog ------------------------------------------------------

_TOOL = shutil.which("tpm2_eventlog")
# Event types whose data tpm2_eventlog does not interpret (it refuses UEFI events whose data
# is not the UEFI structure; we never interpret event data: replay is by digest).
_PLAIN_TYPES = [0x00000001, 0x00000004, 0x00000005, 0x0000000C, 0x0000000D, 0x0000ABCD,
                0x00000012]


def _tpm2_eventlog(log: bytes, tmp: Path) -> dict[str, dict[int, bytes]]:
    assert _TOOL is not None
    path = tmp / "log.bin"
    path.write_bytes(log)
    out = subprocess.run([_TOOL, str(path)], check=True, capture_output=True,
                         timeout=30).stdout.decode("utf-8", "replace")  # event data is raw
    pcrs: dict[str, dict[int, bytes]] = {}
    section = out[out.index("\npcrs:") :]
    bank = ""
    for line in section.splitlines()[1:]:
        if m := re.fullmatch(r"  (sha\d+):", line):
            bank = m.group(1)
            pcrs[bank] = {}
        elif m := re.fullmatch(r"    (\d+)\s*: 0x([0-9a-fA-F]+)", line):
            pcrs[bank][int(m.group(1))] = bytes.fromhex(m.group(2))
    return pcrs


_EVENTS = st.lists(
    st.tuples(st.integers(min_value=0, max_value=23), st.sampled_from(_PLAIN_TYPES),
              st.binary(min_size=4, max_size=40)),
    min_size=1, max_size=30,
)


@pytest.mark.skipif(_TOOL is None, reason="tpm2-tools is not installed")
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=_EVENTS, banks=st.sampled_from([("sha256",), ("sha256", "sha384"), ("sha384",),
                                              ("sha1", "sha256")]))
def test_replay_matches_tpm2_eventlog(events: list[tuple[int, int, bytes]],
                                      banks: tuple[str, ...], tmp_path: Path) -> None:
    builder = EventLogBuilder(banks)
    for pcr, event_type, data in events:
        builder.add(pcr, event_type, data)
    log = builder.to_bytes()
    assert dict(replay_bytes(log).pcrs) == _tpm2_eventlog(log, tmp_path)


@pytest.mark.skipif(_TOOL is None, reason="tpm2-tools is not installed")
def test_replay_of_the_soft_boot_log_matches_tpm2_eventlog(tmp_path: Path) -> None:
    """The separators-and-IPL boot the suite's software TPM measures."""
    builder = EventLogBuilder(("sha256",))
    for n in range(24):
        builder.add(n % 8, 0x0000000D, f"component {n}".encode())
    for pcr in range(8):
        builder.add(pcr, 0x00000004, b"\x00\x00\x00\x00")
    builder.add(9, 0x0000000D, b"sandbox image v1")
    builder.add(9, 0x0000ABCD, b"vendor-specific event")
    log = builder.to_bytes()
    assert dict(replay_bytes(log).pcrs) == _tpm2_eventlog(log, tmp_path)


@pytest.mark.skipif(_TOOL is None, reason="tpm2-tools is not installed")
def test_deliberate_differences_from_tpm2_eventlog(tmp_path: Path) -> None:
    """Two documented strictnesses, both from the PC Client Platform Firmware Profile:

    * EV_NO_ACTION events are never extended (tpm2_eventlog extends their zero digests);
    * a StartupLocality event sets PCR 0's initial value to the locality (tpm2_eventlog
      starts PCR 0 at zero and extends the event's zero digest like any other).
    """
    no_action = EventLogBuilder(("sha256",))
    no_action.add(7, 0x00000003, b"informational")
    no_action.add(4, 0x0000000D, b"measured")
    log = no_action.to_bytes()
    ours, theirs = dict(replay_bytes(log).pcrs), _tpm2_eventlog(log, tmp_path)
    assert ours["sha256"][4] == theirs["sha256"][4]
    assert 7 not in ours["sha256"] and 7 in theirs["sha256"]

    located = EventLogBuilder(("sha256",), locality=3)
    located.add(0, 0x0000000D, b"crtm")
    log = located.to_bytes()
    ours, theirs = dict(replay_bytes(log).pcrs), _tpm2_eventlog(log, tmp_path)
    import hashlib

    digest = hashlib.sha256(b"crtm").digest()
    assert ours["sha256"][0] == hashlib.sha256(bytes(31) + b"\x03" + digest).digest()
    zero_extended = hashlib.sha256(bytes(64)).digest()
    assert theirs["sha256"][0] == hashlib.sha256(zero_extended + digest).digest()
