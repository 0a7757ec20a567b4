"""WebAuthn for people (pure): options, registration, assertions and decision challenges.

Built on py_webauthn (``webauthn`` 3.x), with what it leaves to the relying party done here:

* user verification is required everywhere (the library defaults to "preferred" / not checked),
  and passkeys must be discoverable (resident keys);
* ``crossOrigin`` and ``topOrigin`` in clientDataJSON are refused (no approving inside a frame);
* the ``userHandle`` of an assertion, when present, must be the person's, and the
  backup-eligible flag must not differ from the one registered;
* each check that fails raises its own reason code, in a fixed order (see
  :func:`verify_assertion`), so a refusal says what was wrong.

A decision challenge is ``SHA-256("sandboxsec/approval/v1\\0" || preimage)`` where the preimage
is the canonical JSON of the approval id, its ``params_hmac`` (the params hash keyed under the
tenant's digest key, the value the audit log holds; a plain hash of low-entropy payment params
would let anyone with the log test guesses), the decision, the person, the expiry and 32 random
bytes: an assertion over it proves this authenticator approved (or denied) exactly this request
with these parameters, and nothing else.  Nothing here reads the clock,
the database or the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import parse_authenticator_data
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import InvalidAuthenticationResponse, WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from sandboxsec.clock import rfc3339
from sandboxsec.encoding import b64url_decode_strict, b64url_encode
from sandboxsec.people.errors import (
    AssertionChallengeMismatchError,
    AssertionCounterError,
    AssertionCrossOriginError,
    AssertionFlagsError,
    AssertionMalformedError,
    AssertionOriginMismatchError,
    AssertionRpMismatchError,
    AssertionSignatureInvalidError,
    AssertionUserNotVerifiedError,
    RegistrationInvalidError,
)
from sandboxsec.policy.canonical import canonical_json

__all__ = [
    "DECISION_DOMAIN",
    "Assertion",
    "RegisteredPasskey",
    "VerifiedAssertion",
    "authentication_options",
    "b64url",
    "b64url_decode",
    "decision_challenge",
    "decision_preimage",
    "parse_assertion",
    "registration_options",
    "verify_assertion",
    "verify_registration",
]

#: Domain separation of decision challenges from every other use of a passkey.
DECISION_DOMAIN = b"sandboxsec/approval/v1\x00"
_ALGS = [COSEAlgorithmIdentifier.ECDSA_SHA_256, COSEAlgorithmIdentifier.EDDSA,
         COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256]
_MAX_FIELD = 16 * 1024


def b64url(data: bytes) -> str:
    """Unpadded base64url, as WebAuthn JSON uses."""
    return b64url_encode(data)


def b64url_decode(text: Any, what: str = "value") -> bytes:
    """Canonical unpadded base64url, as WebAuthn's JSON forms use it (one spelling per
    value, so ``id`` and ``rawId`` compare as text would); anything else is
    ``assertion_malformed``."""
    if not isinstance(text, str) or len(text) > _MAX_FIELD:
        raise AssertionMalformedError(f"{what} is not a base64url string")
    try:
        return b64url_decode_strict(text)
    except ValueError as exc:
        raise AssertionMalformedError(f"{what} is not canonical unpadded base64url") from exc


def decision_preimage(*, tenant_id: str, approval_id: str, params_hmac: str, decision: str,
                      person_id: str, expires_at: datetime, nonce: bytes) -> bytes:
    """The canonical JSON a decision challenge commits to (logged with the decision)."""
    return canonical_json({
        "approval_id": approval_id, "decision": decision, "exp": rfc3339(expires_at),
        "nonce": b64url(nonce), "params_hmac": params_hmac, "person_id": person_id,
        "tenant_id": tenant_id, "v": 1,
    })


def decision_challenge(preimage: bytes) -> bytes:
    """The WebAuthn challenge of a decision: SHA-256 of the domain tag and the preimage."""
    return hashlib.sha256(DECISION_DOMAIN + preimage).digest()


def registration_options(*, rp_id: str, rp_name: str, user_handle: bytes, handle: str,
                         display_name: str, challenge: bytes, exclude: Sequence[bytes],
                         timeout_ms: int) -> dict[str, Any]:
    """``PublicKeyCredentialCreationOptions`` as JSON: resident key and UV required."""
    options = generate_registration_options(
        rp_id=rp_id, rp_name=rp_name, user_name=handle, user_id=user_handle,
        user_display_name=display_name, challenge=challenge, timeout=timeout_ms,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED, require_resident_key=True,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[PublicKeyCredentialDescriptor(id=c) for c in exclude],
        supported_pub_key_algs=_ALGS,
    )
    value: dict[str, Any] = json.loads(options_to_json(options))
    return value


def authentication_options(*, rp_id: str, challenge: bytes, allow: Sequence[bytes],
                           timeout_ms: int) -> dict[str, Any]:
    """``PublicKeyCredentialRequestOptions`` as JSON with user verification required."""
    options = generate_authentication_options(
        rp_id=rp_id, challenge=challenge, timeout=timeout_ms,
        allow_credentials=[PublicKeyCredentialDescriptor(id=c) for c in allow],
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    value: dict[str, Any] = json.loads(options_to_json(options))
    return value


@dataclass(frozen=True, slots=True)
class RegisteredPasskey:
    """A verified registration: what is stored and logged (the trust anchor of the passkey)."""

    credential_id: bytes
    public_key: bytes
    sign_count: int
    aaguid: str
    backup_eligible: bool
    backed_up: bool
    user_verified: bool
    client_data_json: bytes
    attestation_object: bytes


def _client_data(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AssertionMalformedError("clientDataJSON is not JSON") from exc
    if not isinstance(value, dict):
        raise AssertionMalformedError("clientDataJSON is not a JSON object")
    return value


def _check_frame(client: Mapping[str, Any], origins: Sequence[str]) -> None:
    if client.get("crossOrigin") not in (None, False):
        raise AssertionCrossOriginError("the passkey was used inside a cross-origin frame")
    top = client.get("topOrigin")
    if top is not None and top not in origins:
        raise AssertionCrossOriginError("the passkey was used inside a frame of another site")


def verify_registration(credential: Mapping[str, Any], *, challenge: bytes, rp_id: str,
                        origins: Sequence[str]) -> RegisteredPasskey:
    """Verify a ``navigator.credentials.create()`` result (JSON) made for ``challenge``.

    Attestation "none" is accepted (normal for passkeys): the logged enrolment is the trust
    anchor.  User verification is required; frames are refused.
    """
    try:
        response = credential["response"]
        client_raw = b64url_decode(response["clientDataJSON"], "clientDataJSON")
        attestation_raw = b64url_decode(response["attestationObject"], "attestationObject")
    except (KeyError, TypeError) as exc:
        raise RegistrationInvalidError("the registration lacks its response fields") from exc
    except AssertionMalformedError as exc:
        raise RegistrationInvalidError(exc.message) from exc
    try:
        _check_frame(_client_data(client_raw), origins)
    except (AssertionCrossOriginError, AssertionMalformedError) as exc:
        raise RegistrationInvalidError(exc.message) from exc
    try:
        verified = verify_registration_response(
            credential=dict(credential), expected_challenge=challenge, expected_rp_id=rp_id,
            expected_origin=list(origins), require_user_verification=True,
            supported_pub_key_algs=_ALGS,
        )
    except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
        raise RegistrationInvalidError(f"the passkey registration did not verify: {exc}"
                                       ) from exc
    return RegisteredPasskey(
        credential_id=verified.credential_id, public_key=verified.credential_public_key,
        sign_count=verified.sign_count, aaguid=verified.aaguid,
        backup_eligible=verified.credential_device_type == CredentialDeviceType.MULTI_DEVICE,
        backed_up=verified.credential_backed_up,
        user_verified=verified.user_verified, client_data_json=client_raw,
        attestation_object=attestation_raw,
    )


@dataclass(frozen=True, slots=True)
class Assertion:
    """The exact bytes of a ``navigator.credentials.get()`` result (never re-serialized)."""

    credential_id: bytes
    client_data_json: bytes
    authenticator_data: bytes
    signature: bytes
    user_handle: bytes | None

    def to_log(self) -> dict[str, str | None]:
        """The assertion as recorded in the audit log (standard base64 of the exact bytes)."""
        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode("ascii")

        return {
            "credential_id": b64(self.credential_id),
            "client_data_json": b64(self.client_data_json),
            "authenticator_data": b64(self.authenticator_data),
            "signature": b64(self.signature),
            "user_handle": b64(self.user_handle) if self.user_handle is not None else None,
        }


def parse_assertion(credential: Any) -> Assertion:
    """Parse the browser's JSON (``PublicKeyCredential.toJSON()`` shape) into exact bytes."""
    if not isinstance(credential, Mapping):
        raise AssertionMalformedError("the assertion is not a JSON object")
    response = credential.get("response")
    if credential.get("type") != "public-key" or not isinstance(response, Mapping):
        raise AssertionMalformedError("the assertion is not a public-key credential")
    raw_id = b64url_decode(credential.get("rawId", credential.get("id")), "rawId")
    if "id" in credential and b64url_decode(credential["id"], "id") != raw_id:
        raise AssertionMalformedError("id and rawId differ")
    handle = response.get("userHandle")
    return Assertion(
        credential_id=raw_id,
        client_data_json=b64url_decode(response.get("clientDataJSON"), "clientDataJSON"),
        authenticator_data=b64url_decode(response.get("authenticatorData"),
                                         "authenticatorData"),
        signature=b64url_decode(response.get("signature"), "signature"),
        user_handle=None if handle in (None, "") else b64url_decode(handle, "userHandle"),
    )


@dataclass(frozen=True, slots=True)
class VerifiedAssertion:
    """What a verified assertion tells: the new sign count and the flags."""

    sign_count: int
    user_verified: bool
    backup_eligible: bool
    backed_up: bool


def verify_assertion(assertion: Assertion, *, challenge: bytes, rp_id: str,
                     origins: Sequence[str], public_key: bytes, stored_sign_count: int,
                     user_handle: bytes | None, backup_eligible: bool | None
                     ) -> VerifiedAssertion:
    """Check an assertion against what the server expects, in order:

    1. clientDataJSON parses, its type is ``webauthn.get``;
    2. its challenge is ``challenge`` (else another request, params or decision was signed);
    3. its origin is one of ``origins``; no crossOrigin, no foreign topOrigin;
    4. authenticatorData parses; rpIdHash is SHA-256(``rp_id``);
    5. user present and user verified flags are set;
    6. the user handle, when sent, is the person's; backup eligibility as registered;
    7. the sign counter increased (when either side is non-zero);
    8. the signature verifies under the registered COSE key (py_webauthn re-checks 1-5 too).

    ``stored_sign_count=0`` and ``user_handle=None`` / ``backup_eligible=None`` skip the checks
    an offline verifier cannot make (the counter belongs to the online path).
    """
    # 1.
    client = _client_data(assertion.client_data_json)
    if client.get("type") != "webauthn.get":
        raise AssertionMalformedError("clientDataJSON is not of type webauthn.get")
    # 2.
    if b64url_decode(client.get("challenge"), "challenge") != challenge:
        raise AssertionChallengeMismatchError(
            "the assertion signs another challenge (another request, params or decision)")
    # 3.
    if client.get("origin") not in origins:
        raise AssertionOriginMismatchError(
            f"the passkey was used on origin {str(client.get('origin'))[:100]!r}")
    _check_frame(client, origins)
    # 4.
    try:
        auth = parse_authenticator_data(assertion.authenticator_data)
    except Exception as exc:  # the parser raises several types for short or bad data
        raise AssertionMalformedError("authenticatorData is malformed") from exc
    if auth.rp_id_hash != hashlib.sha256(rp_id.encode("utf-8")).digest():
        raise AssertionRpMismatchError("the assertion is for another relying party")
    # 5.
    if not auth.flags.up:
        raise AssertionUserNotVerifiedError("the user was not present")
    if not auth.flags.uv:
        raise AssertionUserNotVerifiedError("the authenticator did not verify the user")
    # 6.
    if user_handle is not None and assertion.user_handle is not None \
            and assertion.user_handle != user_handle:
        raise AssertionFlagsError("the assertion's user handle is not this person's")
    if backup_eligible is not None and bool(auth.flags.be) != backup_eligible:
        raise AssertionFlagsError("the backup-eligible flag differs from the registration")
    # 7.
    if (auth.sign_count > 0 or stored_sign_count > 0) and auth.sign_count <= stored_sign_count:
        raise AssertionCounterError(
            f"sign count {auth.sign_count} did not increase over {stored_sign_count}")
    # 8.
    try:
        verify_authentication_response(
            credential={
                "id": b64url(assertion.credential_id), "rawId": b64url(assertion.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": b64url(assertion.client_data_json),
                    "authenticatorData": b64url(assertion.authenticator_data),
                    "signature": b64url(assertion.signature),
                    **({"userHandle": b64url(assertion.user_handle)}
                       if assertion.user_handle is not None else {}),
                },
            },
            expected_challenge=challenge, expected_rp_id=rp_id, expected_origin=list(origins),
            credential_public_key=public_key, credential_current_sign_count=stored_sign_count,
            require_user_verification=True,
        )
    except InvalidAuthenticationResponse as exc:
        raise AssertionSignatureInvalidError("the assertion's signature does not verify"
                                             ) from exc
    except Exception as exc:  # a malformed COSE key or signature encoding
        raise AssertionSignatureInvalidError("the assertion's signature cannot be checked"
                                             ) from exc
    return VerifiedAssertion(sign_count=auth.sign_count, user_verified=bool(auth.flags.uv),
                             backup_eligible=bool(auth.flags.be), backed_up=bool(auth.flags.bs))
