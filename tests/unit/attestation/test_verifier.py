"""The pure verifier: one affirming path, and every check's failure with its reason code."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxsec.attestation.image import VerifiedManifest, verify_manifest
from sandboxsec.attestation.image_errors import ImageManifestExpiredError
from sandboxsec.attestation.quote import ClockInfo
from sandboxsec.attestation.verifier import (
    Binding,
    Evidence,
    NonceState,
    VerifierContext,
    verify_evidence,
)
from tests.support.pki import make_publisher
from tests.support.softtpm import (
    SoftAk,
    boot_log,
    make_manifest,
    marshal_quote,
    sign_quote,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
NONCE = bytes(range(32))
AK = SoftAk()
PUBLISHER = make_publisher()
LOG, PCRS, DIGESTS = boot_log(24)
MANIFEST = make_manifest(PUBLISHER, PCRS, event_digests={4: tuple(DIGESTS[4])})
VERIFIED = verify_manifest(MANIFEST, PUBLISHER.trust(), NOW)
EK_FP = "ab" * 32


def evidence(**over: object) -> Evidence:
    q = marshal_quote(NONCE, {"sha256": PCRS})
    base: dict[str, object] = dict(
        nonce=NONCE, quote=q, signature=sign_quote(AK, q), ak_public=AK.public,
        pcrs={"sha256": PCRS}, image_manifest=MANIFEST, event_log=LOG,
    )
    base.update(over)
    return Evidence(**base)  # type: ignore[arg-type]


def context(**over: object) -> VerifierContext:
    base: dict[str, object] = dict(
        tenant_id="tn_a", now=NOW, nonce_state=NonceState.FRESH,
        binding=Binding(ak_name=AK.name, ek_fingerprint=EK_FP), manifest=VERIFIED,
    )
    base.update(over)
    return VerifierContext(**base)  # type: ignore[arg-type]


def codes(ev: Evidence, ctx: VerifierContext | None = None) -> tuple[str, ...]:
    return verify_evidence(ev, ctx or context()).failure_codes


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1
    return bytes(out)


def test_affirming() -> None:
    result = verify_evidence(evidence(), context())
    assert result.status == "affirming", result.failures
    assert result.ak_name == AK.name.hex()
    assert result.image_digest == VERIFIED.image_digest
    assert result.clock == ClockInfo(1000, 1, 0, True)
    assert set(result.trust_vector.values()) == {2}


def test_without_event_log_executables_has_no_claim() -> None:
    manifest = make_manifest(PUBLISHER, PCRS)
    verified = verify_manifest(manifest, PUBLISHER.trust(), NOW)
    result = verify_evidence(evidence(event_log=None, image_manifest=manifest),
                             context(manifest=verified))
    assert result.status == "affirming"
    assert result.trust_vector["executables"] == 0


@pytest.mark.parametrize(
    ("state", "code"),
    [(NonceState.UNKNOWN, "attestation_nonce_unknown"),
     (NonceState.EXPIRED, "attestation_nonce_expired"),
     (NonceState.REPLAYED, "attestation_nonce_replayed")],
)
def test_nonce_states(state: NonceState, code: str) -> None:
    assert codes(evidence(), context(nonce_state=state)) == (code,)


def test_flipped_quote_bit_breaks_signature() -> None:
    ev = evidence()
    # A bit inside the clock field: the structure still parses, the signature does not verify.
    assert codes(replace(ev, quote=flip(ev.quote, 80))) == ("quote_signature_invalid",)


def test_flipped_signature_bit() -> None:
    ev = evidence()
    assert codes(replace(ev, signature=flip(ev.signature, 12))) == ("quote_signature_invalid",)


def test_flipped_nonce_bit() -> None:
    assert codes(evidence(nonce=flip(NONCE, 0))) == ("quote_nonce_mismatch",)


def test_flipped_pcr_value() -> None:
    pcrs = {"sha256": {**PCRS, 1: flip(PCRS[1], 0)}}
    found = codes(evidence(pcrs=pcrs))
    assert found[0] == "quote_pcr_digest_mismatch"
    assert "pcr_reference_mismatch" in found


def test_quote_of_other_pcrs_than_the_reference() -> None:
    other = {**PCRS, 7: b"\x07" * 32}
    q = marshal_quote(NONCE, {"sha256": other})
    found = codes(evidence(quote=q, signature=sign_quote(AK, q), pcrs={"sha256": other},
                           event_log=None))
    assert found == ("pcr_reference_mismatch", "eventlog_required")


def test_wrong_magic() -> None:
    q = marshal_quote(NONCE, {"sha256": PCRS}, magic=0x12345678)
    assert codes(evidence(quote=q, signature=sign_quote(AK, q))) == ("quote_magic_invalid",)


def test_malformed_quote_still_reports_other_failures() -> None:
    found = codes(evidence(quote=b"\xff\x54"), context(nonce_state=NonceState.REPLAYED))
    assert found == ("attestation_nonce_replayed", "quote_malformed")


def test_sha1_downgrade_refused() -> None:
    q = marshal_quote(NONCE, {"sha256": PCRS}, hash_alg="sha1")
    assert codes(evidence(quote=q, signature=sign_quote(AK, q, hash_alg="sha1"))) == (
        "quote_algorithm_refused",
    )


def test_unbound_ak() -> None:
    assert codes(evidence(), context(binding=None)) == ("ak_not_bound",)
    other = SoftAk()
    q = marshal_quote(NONCE, {"sha256": PCRS})
    ev = evidence(ak_public=other.public, signature=sign_quote(other, q))
    assert codes(ev) == ("ak_not_bound",)


def test_presented_ek_differs_from_bound_ek() -> None:
    assert codes(evidence(ek_certificate=b"another EK certificate")) == ("ak_binding_mismatch",)


def test_ek_chain_failure_is_reported() -> None:
    from sandboxsec.attestation.image_errors import CertificateRevokedError

    err = CertificateRevokedError("serial is on the revocation list")
    assert codes(evidence(), context(ek_chain_error=err)) == ("cert_revoked",)


def test_clock_unsafe_and_rollback() -> None:
    q = marshal_quote(NONCE, {"sha256": PCRS}, safe=False)
    assert codes(evidence(quote=q, signature=sign_quote(AK, q))) == ("quote_clock_unsafe",)
    later = Binding(AK.name, EK_FP, last_clock=ClockInfo(5, 2, 0, True))
    assert codes(evidence(), context(binding=later)) == ("quote_clock_rollback",)


def test_manifest_failures_pass_through() -> None:
    err = ImageManifestExpiredError("expired")
    result = verify_evidence(evidence(), context(manifest=err))
    assert result.failure_codes == ("image_manifest_expired",)
    assert result.trust_vector["executables"] == 96


def test_event_log_that_does_not_replay() -> None:
    bad_log, _, _ = boot_log(25)
    assert codes(evidence(event_log=bad_log)) == ("eventlog_replay_mismatch",)
    assert codes(evidence(event_log=LOG[:-1])) == ("eventlog_malformed",)


def test_every_failure_is_reported_at_once() -> None:
    ev = evidence(nonce=flip(NONCE, 1), event_log=boot_log(3)[0])
    ctx = context(nonce_state=NonceState.EXPIRED, binding=None,
                  manifest=ImageManifestExpiredError("expired"))
    result = verify_evidence(ev, ctx)
    assert result.status == "contraindicated"
    assert set(result.failure_codes) == {
        "attestation_nonce_expired", "quote_nonce_mismatch", "ak_not_bound",
        "image_manifest_expired", "eventlog_replay_mismatch",
    }


def test_manifest_type_is_the_image_modules() -> None:
    assert isinstance(VERIFIED, VerifiedManifest)
    assert VERIFIED.expires_at > NOW + timedelta(days=1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(["quote", "signature", "ak_public", "event_log", "nonce"]),
    data=st.data(),
)
def test_mutated_evidence_is_contraindicated_never_a_crash(field: str, data: st.DataObject) -> None:
    ev = evidence()
    original: bytes = getattr(ev, field)
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        if mutated and data.draw(st.booleans()):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] ^= data.draw(st.integers(1, 255))
        else:
            cut = data.draw(st.integers(0, len(mutated)))
            mutated = mutated[:cut] + bytearray(data.draw(st.binary(max_size=4)))
    if bytes(mutated) == original:
        return
    result = verify_evidence(replace(ev, **{field: bytes(mutated)}), context())
    if field == "event_log" and result.affirming:
        # Event data is not measured (replay is by digest): a change there alone is harmless.
        return
    assert result.status == "contraindicated"
    assert result.failures and all(f.code for f in result.failures)
