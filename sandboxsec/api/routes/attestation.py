"""Routes: attestation challenges, AK binding, evidence verification, the token keys."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.attestation.errors import EvidenceMalformedError
from sandboxsec.attestation.service import decode_evidence_field
from sandboxsec.attestation.verifier import Evidence
from sandboxsec.encoding import ascii_int, hex_decode_strict
from sandboxsec.metrics import VERDICTS
from sandboxsec.principal import Principal

router = APIRouter(tags=["attestation"])

_B64_LIMIT = 64 * 1024  # quotes, signatures, public areas and certificates are small
_LOG_LIMIT = 8 * 1024 * 1024


class ChallengeIn(BaseModel):
    ak_name: str | None = Field(
        default=None, max_length=140,
        description="hex TPM name of a bound AK: only a quote by that AK can use the nonce")


class ChallengeOut(BaseModel):
    nonce: str = Field(description="base64; put it in the quote's qualifying data")
    expires_at: datetime


class FailureOut(BaseModel):
    code: str
    message: str


class VerifyIn(BaseModel):
    nonce: str = Field(max_length=256)
    quote: str = Field(max_length=_B64_LIMIT, description="base64 TPMS_ATTEST")
    signature: str = Field(max_length=_B64_LIMIT, description="base64 TPMT_SIGNATURE")
    ak_public: str = Field(max_length=_B64_LIMIT, description="base64 TPM2B_PUBLIC")
    ek_certificate: str | None = Field(default=None, max_length=_B64_LIMIT)
    pcrs: dict[str, dict[str, str]] = Field(description='{"sha256": {"0": hex, ...}}')
    event_log: str | None = Field(default=None, max_length=_LOG_LIMIT)
    image_manifest: dict[str, Any] | str = Field(description="the DSSE envelope (JSON)")
    session_key: str | None = Field(
        default=None, max_length=_B64_LIMIT,
        description="base64 TPM2B_PUBLIC of the TPM-held session key (docs/attestation.md)")
    session_key_certify: str | None = Field(
        default=None, max_length=_B64_LIMIT,
        description="base64 TPMS_ATTEST of TPM2_Certify(session key) by the AK over the nonce")
    session_key_signature: str | None = Field(
        default=None, max_length=_B64_LIMIT, description="base64 TPMT_SIGNATURE of that certify")


class VerifyOut(BaseModel):
    status: str
    failures: list[FailureOut]
    token: str | None
    attestation_id: str
    token_expires_at: datetime | None = None
    trust_vector: dict[str, int]
    ak_name: str
    image_digest: str
    unknown_event_types: list[str]
    session_key_jkt: str | None = Field(
        default=None, description="RFC 7638 thumbprint of the certified session key (cnf.jkt)")


class AkChallengeIn(BaseModel):
    ak_public: str = Field(max_length=_B64_LIMIT, description="base64 TPM2B_PUBLIC of the AK")
    ek_certificate: str = Field(max_length=_B64_LIMIT, description="base64 DER")
    ek_public: str | None = Field(
        default=None, max_length=_B64_LIMIT, description="base64 TPM2B_PUBLIC of the EK"
    )
    ek_intermediates: list[str] = Field(default_factory=list, max_length=8)


class AkChallengeOut(BaseModel):
    credential_id: str
    credential_blob: str = Field(description="base64 TPM2B_ID_OBJECT")
    encrypted_secret: str = Field(description="base64 TPM2B_ENCRYPTED_SECRET")
    ak_name: str = Field(description="hex TPM name the credential is bound to")
    expires_at: datetime


class AkActivateIn(BaseModel):
    credential_id: str = Field(max_length=64)
    secret: str = Field(max_length=256, description="base64 of what ActivateCredential returned")


class AkActivateOut(BaseModel):
    ak_name: str
    bound: bool


def _enc(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64(value: str, what: str) -> bytes:
    return decode_evidence_field(value, what)


def _opt_b64(value: str | None, what: str) -> bytes | None:
    return _b64(value, what) if value is not None else None


def _pcrs(raw: dict[str, dict[str, str]]) -> dict[str, dict[int, bytes]]:
    out: dict[str, dict[int, bytes]] = {}
    if len(raw) > 8:
        raise EvidenceMalformedError("too many PCR banks")
    for bank, values in raw.items():
        parsed: dict[int, bytes] = {}
        for index, value in values.items():
            # ASCII digits only: str.isdigit() is true for "²" and "①", which int() refuses.
            try:
                number = ascii_int(index, maximum=23)
            except ValueError:
                raise EvidenceMalformedError("a PCR index is not a decimal 0..23") from None
            try:
                parsed[number] = hex_decode_strict(value)
            except ValueError:
                raise EvidenceMalformedError(f"PCR {bank}:{number} is not hex") from None
        out[bank] = parsed
    return out


def _json(out: BaseModel) -> Response:
    """``out`` as the JSON body, the very bytes FastAPI writes for a ``response_model``.

    Returned as a :class:`Response` because FastAPI would otherwise validate the model it was
    just given once more and, for a sync route, do so in a second trip through the thread
    pool (which cost more than the rest of the serialisation).  ``out`` was validated when it
    was built; ``response_model`` still documents the shape.
    """
    return Response(out.model_dump_json().encode("utf-8"), media_type="application/json")


def _manifest(value: dict[str, Any] | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


@router.post("/attestation/challenge", response_model=ChallengeOut)
async def challenge(
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("attestation:challenge"))],
    body: ChallengeIn | None = None,
) -> Response:
    """A single-use 32-byte nonce for the next quote; it expires after
    ``nonce_ttl_seconds``.

    Async on purpose: minting is an HMAC, with no database or file access once the nonce key
    is loaded, so the event loop answers it without a hop to the thread pool.
    """
    ak_name = None
    if body is not None and body.ak_name is not None:
        try:
            ak_name = hex_decode_strict(body.ak_name)
        except ValueError:
            raise EvidenceMalformedError("ak_name is not hex") from None
        if not 2 < len(ak_name) <= 66:
            raise EvidenceMalformedError("ak_name is not a TPM name")
    issued = services.attestation.issue_nonce(who, ak_name=ak_name)
    return _json(ChallengeOut(nonce=_enc(issued.nonce), expires_at=issued.expires_at))


@router.post("/attestation/verify", response_model=VerifyOut)
def verify(
    body: VerifyIn,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("attestation:verify"))],
) -> Response:
    """Verify a quote and its evidence; ``affirming`` comes with a short-lived token."""
    evidence = Evidence(
        nonce=_b64(body.nonce, "nonce"),
        quote=_b64(body.quote, "quote"),
        signature=_b64(body.signature, "signature"),
        ak_public=_b64(body.ak_public, "ak_public"),
        ek_certificate=_b64(body.ek_certificate, "ek_certificate")
        if body.ek_certificate
        else None,
        pcrs=_pcrs(body.pcrs),
        event_log=_b64(body.event_log, "event_log") if body.event_log is not None else None,
        image_manifest=_manifest(body.image_manifest),
        session_key=_opt_b64(body.session_key, "session_key"),
        session_key_certify=_opt_b64(body.session_key_certify, "session_key_certify"),
        session_key_signature=_opt_b64(body.session_key_signature, "session_key_signature"),
    )
    verdict = services.attestation.verify(who, evidence)
    result = verdict.result
    VERDICTS.labels(str(result.status),
                    result.failures[0].code if result.failures else "none").inc()
    return _json(VerifyOut(
        status=result.status,
        failures=[FailureOut(code=f.code, message=f.message) for f in result.failures],
        token=verdict.token,
        attestation_id=verdict.attestation_id,
        token_expires_at=verdict.token_expires_at,
        trust_vector=dict(result.trust_vector),
        ak_name=result.ak_name,
        image_digest=result.image_digest,
        unknown_event_types=list(result.unknown_event_types),
        session_key_jkt=result.session_key_jkt if verdict.token else None,
    ))


@router.post("/attestation/ak/challenge", response_model=AkChallengeOut)
def ak_challenge(
    body: AkChallengeIn,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("attestation:ak"))],
) -> Response:
    """MakeCredential for an AK under a certified EK; answer with ActivateCredential."""
    issued = services.attestation.ak_challenge(
        who,
        ak_public=_b64(body.ak_public, "ak_public"),
        ek_certificate=_b64(body.ek_certificate, "ek_certificate"),
        ek_public=_b64(body.ek_public, "ek_public") if body.ek_public else None,
        ek_intermediates=[_b64(c, "ek_intermediates") for c in body.ek_intermediates],
    )
    return _json(AkChallengeOut(
        credential_id=issued.credential_id,
        credential_blob=_enc(issued.credential_blob),
        encrypted_secret=_enc(issued.encrypted_secret),
        ak_name=issued.ak_name,
        expires_at=issued.expires_at,
    ))


@router.post("/attestation/ak/activate", response_model=AkActivateOut)
def ak_activate(
    body: AkActivateIn,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("attestation:ak"))],
) -> Response:
    """Return the activated secret; a match binds the AK to the certified EK."""
    bound = services.attestation.ak_activate(
        who, credential_id=body.credential_id, secret=_b64(body.secret, "secret")
    )
    return _json(AkActivateOut(ak_name=bound.ak_name, bound=True))


@router.get("/attestation/keys")
def keys(services: ServicesDep) -> dict[str, list[dict[str, str]]]:
    """The JWK Set that verifies attestation tokens offline (public, no auth)."""
    return services.attestation.public_jwks()
