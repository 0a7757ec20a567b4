"""The attestation verifier: evidence + what the service knows -> one verdict, every failure.

Contract: :func:`verify_evidence` is pure.  The service gathers the facts that need storage or
caches (the nonce's state, the AK's binding and last clock, the verified manifest, the EK
chain's outcome) into a :class:`VerifierContext`; this module performs every check, keeps
going after a failure wherever a later check still has its inputs, and returns an
:class:`AttestationResult` that is ``affirming`` only when nothing failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Final

from sandboxsec.attestation import certify, eventlog, quote
from sandboxsec.attestation.errors import (
    AkNameMismatchError,
    AkNotBoundError,
    EventLogRequiredError,
    NonceExpiredError,
    NonceReplayedError,
    NonceUnknownError,
    PcrReferenceMismatchError,
    PcrReferenceNotQuotedError,
)
from sandboxsec.attestation.image import VerifiedManifest
from sandboxsec.attestation.token import TRUST_AFFIRMING, TRUST_CONTRAINDICATED, TRUST_NONE
from sandboxsec.errors import SandboxSecError

__all__ = [
    "AFFIRMING",
    "CONTRAINDICATED",
    "AttestationResult",
    "Binding",
    "Evidence",
    "Failure",
    "NonceState",
    "VerifierContext",
    "verify_evidence",
]

AFFIRMING: Final = "affirming"
CONTRAINDICATED: Final = "contraindicated"

# AR4SI trustworthiness-vector components a failure of each check counts against.
HARDWARE: Final = "hardware"
INSTANCE: Final = "instance-identity"
CONFIGURATION: Final = "configuration"
EXECUTABLES: Final = "executables"
_COMPONENTS: Final = (INSTANCE, CONFIGURATION, EXECUTABLES, HARDWARE)


class NonceState(StrEnum):
    """What the nonce store said when the submission tried to consume the nonce."""

    FRESH = "fresh"  # issued to this tenant, unexpired, and consumed by this submission
    UNKNOWN = "unknown"  # never issued to this tenant (or to anyone)
    EXPIRED = "expired"
    REPLAYED = "replayed"


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the sandbox submitted, decoded from the wire but not yet trusted."""

    nonce: bytes
    quote: bytes
    signature: bytes
    ak_public: bytes
    pcrs: Mapping[str, Mapping[int, bytes]]
    image_manifest: bytes
    ek_certificate: bytes | None = None
    event_log: bytes | None = None
    #: The session key's TPM2B_PUBLIC and its TPM2_Certify by the AK (TPMS_ATTEST,
    #: TPMT_SIGNATURE) over the nonce; see :mod:`sandboxsec.attestation.certify`.
    session_key: bytes | None = None
    session_key_certify: bytes | None = None
    session_key_signature: bytes | None = None


@dataclass(frozen=True, slots=True)
class Binding:
    """A bound AK of this tenant: its name, the EK it was bound to, the last clock accepted."""

    ak_name: bytes
    ek_fingerprint: str
    last_clock: quote.ClockInfo | None = None


@dataclass(frozen=True, slots=True)
class VerifierContext:
    """The facts the service looked up for this submission.

    ``manifest`` is the verified manifest or the error its verification raised;
    ``ek_chain_error`` is ``None`` when the bound EK's certificate still chains to a trusted
    manufacturer CA at ``now``.
    """

    tenant_id: str
    now: datetime
    nonce_state: NonceState
    binding: Binding | None
    manifest: VerifiedManifest | SandboxSecError
    ek_chain_error: SandboxSecError | None = None
    policy: quote.QuotePolicy = field(default_factory=quote.QuotePolicy)
    max_event_log_bytes: int = eventlog.DEFAULT_MAX_BYTES
    max_events: int = eventlog.DEFAULT_MAX_EVENTS


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed check: the stable reason code, a sentence, and the vector component hit."""

    code: str
    message: str
    component: str


@dataclass(frozen=True, slots=True)
class AttestationResult:
    """The verdict and what it was about."""

    status: str
    failures: tuple[Failure, ...]
    trust_vector: Mapping[str, int]
    nonce: str  # hex
    ak_name: str = ""  # hex
    image_name: str = ""
    image_digest: str = ""
    clock: quote.ClockInfo | None = None  # set when the quote's signature verified
    unknown_event_types: tuple[str, ...] = ()
    event_count: int = 0
    session_key_jkt: str | None = None  # set when a session key was sent and verified

    @property
    def affirming(self) -> bool:
        return self.status == AFFIRMING

    @property
    def failure_codes(self) -> tuple[str, ...]:
        return tuple(f.code for f in self.failures)


# The checks each trust-vector component is made of: a component is affirming only when every
# one of its checks ran and passed, contraindicated when one failed, and "no claim" otherwise
# (a malformed quote compared no PCR, so it says nothing about the configuration).
_CHECKS: Final[Mapping[str, frozenset[str]]] = {
    INSTANCE: frozenset({"nonce", "quote_nonce", "clock"}),
    HARDWARE: frozenset({"structure", "ak", "signature", "binding"}),
    CONFIGURATION: frozenset({"pcr_digest", "reference_pcrs"}),
    EXECUTABLES: frozenset({"manifest", "event_log"}),
}


class _Collector:
    __slots__ = ("failures", "passed")

    def __init__(self) -> None:
        self.failures: list[Failure] = []
        self.passed: set[str] = set()

    def add(self, exc: SandboxSecError, component: str) -> None:
        self.failures.append(Failure(exc.reason, exc.message, component))

    def ok(self, check: str) -> None:
        self.passed.add(check)


def verify_evidence(evidence: Evidence, ctx: VerifierContext) -> AttestationResult:
    """Run every check on ``evidence``; ``affirming`` only if none failed.

    The result carries the quote's clock only when the verdict is affirming: a structure
    that failed any check must not move the caller's stored clock state (an AK can sign a
    forged non-TPM-generated structure with huge counters through TPM2_Sign).
    """
    out = _Collector()
    ak: quote.AkPublic | None = None
    parsed: quote.Quote | None = None
    signature: quote.QuoteSignature | None = None
    signature_ok = False

    # 1. The nonce: issued to this tenant, unexpired, and not used before (now consumed).
    if ctx.nonce_state is NonceState.UNKNOWN:
        out.add(NonceUnknownError("the nonce was not issued to this tenant"), INSTANCE)
    elif ctx.nonce_state is NonceState.EXPIRED:
        out.add(NonceExpiredError("the nonce expired before it was used"), INSTANCE)
    elif ctx.nonce_state is NonceState.REPLAYED:
        out.add(NonceReplayedError("the nonce was already used"), INSTANCE)
    else:
        out.ok("nonce")

    # 2. The quote's structure: TPM-generated magic, quote type; extraData is the nonce.
    try:
        parsed = quote.parse_quote(evidence.quote)
        quote.check_structure(parsed)
        out.ok("structure")
    except SandboxSecError as exc:
        out.add(exc, HARDWARE if exc.reason == "quote_magic_invalid" else INSTANCE)
    if parsed is not None:
        try:
            quote.check_nonce(parsed, evidence.nonce)
            out.ok("quote_nonce")
        except SandboxSecError as exc:
            out.add(exc, INSTANCE)

    # 3. The AK: a restricted fixedTPM signing key; its name is what binding refers to.
    try:
        ak = quote.parse_ak_public(evidence.ak_public)
        out.ok("ak")
    except SandboxSecError as exc:
        out.add(exc, HARDWARE)

    # 4. The signature over the quote, with algorithms pinned (no downgrade).
    try:
        signature = quote.parse_signature(evidence.signature)
    except SandboxSecError as exc:
        out.add(exc, HARDWARE)
    if parsed is not None and signature is not None and ak is not None:
        try:
            quote.verify_signature(parsed, signature, ak, ctx.policy)
            signature_ok = True
            out.ok("signature")
        except SandboxSecError as exc:
            out.add(exc, HARDWARE)

    # 5. AK binding: this tenant bound this AK to an EK whose certificate still chains to a
    #    trusted TPM manufacturer, and the EK presented now is that EK.
    if ak is not None:
        _check_binding(evidence, ak, ctx, out)

    # 6. The PCR digest is the hash of the reported PCR values, in selection order.  Only
    #    then are the reported values covered by what the TPM signed.
    pcr_ok = False
    quoted: dict[str, frozenset[int]] = {}
    if parsed is not None and signature is not None:
        try:
            quote.check_pcr_digest(parsed, evidence.pcrs, signature.hash_alg, ctx.policy)
            pcr_ok = True
            out.ok("pcr_digest")
            quoted = {sel.bank: frozenset(sel.indices) for sel in parsed.selections}
        except SandboxSecError as exc:
            out.add(exc, CONFIGURATION)

    # 7. The image: a valid signed manifest, and the quoted PCRs equal its reference values.
    #    Coverage rule: every PCR the reference values name, by value or by event digests,
    #    must be in the signed quote.
    manifest = ctx.manifest if isinstance(ctx.manifest, VerifiedManifest) else None
    if isinstance(ctx.manifest, SandboxSecError):
        out.add(ctx.manifest, EXECUTABLES)
    else:
        out.ok("manifest")
    if manifest is not None:
        try:
            _check_reference_pcrs(manifest, evidence.pcrs)
            if pcr_ok:
                out.ok("reference_pcrs")
        except SandboxSecError as exc:
            out.add(exc, CONFIGURATION)
        if pcr_ok:
            try:
                _check_event_pcrs_quoted(manifest, quoted)
            except SandboxSecError as exc:
                out.add(exc, EXECUTABLES)

    # 8. The TPM clock: safe, and never behind the last quote accepted from this AK.
    #    Only a signed clock means anything; unsigned counters are not compared.
    if parsed is not None and signature_ok:
        try:
            quote.check_clock(parsed.clock, ctx.binding.last_clock if ctx.binding else None)
            out.ok("clock")
        except SandboxSecError as exc:
            out.add(exc, INSTANCE)

    # 9. The event log, when given: it replays to the quoted PCRs, and every event in a PCR
    #    the image pins by event digests is one it allows.  The allow-list is SHA-256 event
    #    digests, so it is checked only when the SHA-256 bank's replay matched the quote.
    unknown: tuple[str, ...] = ()
    events = 0
    if evidence.event_log is not None:
        try:
            replayed = eventlog.replay_bytes(
                evidence.event_log, max_bytes=ctx.max_event_log_bytes, max_events=ctx.max_events
            )
            unknown, events = replayed.unknown_event_types, replayed.event_count
            if pcr_ok:
                matched = eventlog.check_replay(replayed, evidence.pcrs)
                if manifest is not None and manifest.reference.event_digests:
                    if "sha256" not in matched:
                        raise PcrReferenceNotQuotedError(
                            "the image pins SHA-256 event digests but the event log's SHA-256 "
                            "bank was not matched against the quote"
                        )
                    eventlog.check_reference_digests(replayed, manifest.reference.event_digests)
                out.ok("event_log")
        except SandboxSecError as exc:
            out.add(exc, EXECUTABLES)
    elif manifest is not None and manifest.reference.event_digests:
        out.add(
            EventLogRequiredError("the image pins event digests but no event log was sent"),
            EXECUTABLES,
        )

    # 10. The session key, when sent: a TPM-held key certified by this AK over this nonce.
    jkt: str | None = None
    if evidence.session_key is not None and ak is not None:
        try:
            jkt = certify.verify_session_key(
                evidence.session_key, evidence.session_key_certify or b"",
                evidence.session_key_signature or b"", ak=ak, nonce=evidence.nonce,
                policy=ctx.policy,
            ).jkt
        except SandboxSecError as exc:
            out.add(exc, HARDWARE)

    # Only a fully valid quote advances the AK's clock state.
    clock = parsed.clock if parsed is not None and signature_ok and not out.failures else None
    result = _result(out, evidence, ak, manifest, clock, unknown, events)
    return replace(result, session_key_jkt=jkt) if jkt is not None else result


def _check_binding(
    evidence: Evidence, ak: quote.AkPublic, ctx: VerifierContext, out: _Collector
) -> None:
    binding = ctx.binding
    if binding is None or binding.ak_name != ak.name:
        out.add(AkNotBoundError("this AK was never bound to a certified EK"), HARDWARE)
        return
    failed = False
    if evidence.ek_certificate is not None:
        presented = hashlib.sha256(evidence.ek_certificate).hexdigest()
        if presented != binding.ek_fingerprint:
            out.add(AkNameMismatchError("the EK certificate is not the one the AK was bound to"),
                    HARDWARE)
            failed = True
    if ctx.ek_chain_error is not None:
        out.add(ctx.ek_chain_error, HARDWARE)
        failed = True
    if not failed:
        out.ok("binding")


def _check_reference_pcrs(
    manifest: VerifiedManifest, reported: Mapping[str, Mapping[int, bytes]]
) -> None:
    """Every reference PCR value equals the reported one (compared even when the quote
    failed, to name the difference; it counts as passed only on a verified quote, whose
    reported PCRs are exactly the signed selection, so a value-pinned PCR left out of the
    quote is missing here)."""
    wrong: list[str] = []
    for bank, values in manifest.reference.pcrs.items():
        got = reported.get(bank, {})
        for index, expected in values.items():
            if got.get(index) != expected:
                wrong.append(f"{bank}:{index}")
    if wrong:
        raise PcrReferenceMismatchError(
            "PCRs differ from (or are missing against) the image's reference values: "
            + ", ".join(wrong)
        )


def _check_event_pcrs_quoted(
    manifest: VerifiedManifest, quoted: Mapping[str, frozenset[int]]
) -> None:
    """Every PCR the image pins by (SHA-256) event digests is in the quote's SHA-256 bank."""
    sha256 = quoted.get("sha256", frozenset())
    missing = [str(index) for index in manifest.reference.event_digests if index not in sha256]
    if missing:
        raise PcrReferenceNotQuotedError(
            "PCRs the image pins by SHA-256 event digests are not in the quote's SHA-256 "
            "bank: " + ", ".join(missing)
        )


def _result(
    out: _Collector,
    evidence: Evidence,
    ak: quote.AkPublic | None,
    manifest: VerifiedManifest | None,
    clock: quote.ClockInfo | None,
    unknown: tuple[str, ...],
    events: int,
) -> AttestationResult:
    hit = {f.component for f in out.failures}
    # Affirming only for checks that ran and passed; without a log nothing was said about
    # what ran beyond the PCR values, so executables is then "no claim".
    vector = {
        c: TRUST_CONTRAINDICATED if c in hit
        else TRUST_AFFIRMING if _CHECKS[c] <= out.passed
        else TRUST_NONE
        for c in _COMPONENTS
    }
    return AttestationResult(
        status=CONTRAINDICATED if out.failures else AFFIRMING,
        failures=tuple(out.failures),
        trust_vector=vector,
        nonce=evidence.nonce.hex(),
        ak_name=ak.name_hex if ak is not None else "",
        image_name=manifest.image_name if manifest is not None else "",
        image_digest=manifest.image_digest if manifest is not None else "",
        clock=clock,
        unknown_event_types=unknown,
        event_count=events,
    )
