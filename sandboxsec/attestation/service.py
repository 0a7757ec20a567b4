"""The attestation service: the adapter between storage, caches, audit and the pure verifier.

It owns the state attestation needs (single-use nonces, AK credential challenges, bound AKs
with their last clock, verdicts), the trust configuration (publisher and TPM-manufacturer
roots, revocations), the caches (verified manifests and EK chains, by digest) and the
token-signing key.  Every decision is audited in the same transaction as the state change;
when the audit log cannot write, nothing is decided and the caller gets a 503.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Table, delete, insert, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from sandboxsec.attestation import akbind, quote, token
from sandboxsec.attestation import nonce as nonces
from sandboxsec.attestation.bindings import (
    BindingCache,
    BindingSnapshot,
    advance_clock,
    advances,
    load_binding,
)
from sandboxsec.attestation.config import AttestationConfig
from sandboxsec.attestation.errors import (
    AkCredentialExpiredError,
    AkCredentialUsedError,
    AkNameMismatchError,
    AkNotBoundError,
    AttestationKeyUnavailableError,
    EkCertificateMissingError,
    EvidenceMalformedError,
)
from sandboxsec.attestation.image import ManifestVerifier, VerifiedManifest
from sandboxsec.attestation.image_errors import CertificateChainError, ImageDigestRevokedError
from sandboxsec.attestation.models import (
    AkCredential,
    AttestationNonce,
    AttestationRecord,
    BoundAk,
)
from sandboxsec.attestation.trust import TrustStore
from sandboxsec.attestation.verifier import (
    AttestationResult,
    Evidence,
    NonceState,
    VerifierContext,
    verify_evidence,
)
from sandboxsec.attestation.x509chain import (
    TCG_EK_CERTIFICATE,
    VerifiedChain,
    load_pem_certificates,
    verify_chain,
)
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.encoding import b64decode_strict
from sandboxsec.errors import SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.principal import Principal
from sandboxsec.signing import Signer
from sandboxsec.statefiles import create_once
from sandboxsec.storage.db import Database
from sandboxsec.storage.tenancy import get_scoped

__all__ = [
    "AkChallenge",
    "AttestationService",
    "BoundAkView",
    "IssuedNonce",
    "Verdict",
    "decode_evidence_field",
]

CREDENTIAL_BYTES: Final = 32
SIGNING_KEY_FILE: Final = "attestation-token-key.pem"
_NONCES = cast(Table, AttestationNonce.__table__)  # type: ignore[attr-defined]
_CONSUME_PG = pg_insert(_NONCES).on_conflict_do_nothing().returning(_NONCES.c.id)
_CONSUME_SQLITE = sqlite_insert(_NONCES).on_conflict_do_nothing().returning(_NONCES.c.id)
_RECORDS = cast(Table, AttestationRecord.__table__)  # type: ignore[attr-defined]
_INSERT_RECORD = insert(_RECORDS)
NONCE_KEY_FILE: Final = "attestation-nonce-key"
_EK_CACHE_MAX: Final = 4096
_PURGE_EVERY: Final = 512


@dataclass(frozen=True, slots=True)
class IssuedNonce:
    nonce: bytes
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class AkChallenge:
    credential_id: str
    credential_blob: bytes
    encrypted_secret: bytes
    ak_name: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class BoundAkView:
    """An AK bound to its tenant (what an activation returns)."""

    tenant_id: str
    ak_name: str
    ek_fingerprint: str


@dataclass(frozen=True, slots=True)
class Verdict:
    attestation_id: str
    result: AttestationResult
    token: str | None
    token_expires_at: datetime | None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AttestationService:
    """Nonces, AK binding, verification and tokens for one service instance."""

    def __init__(self, db: Database, clock: Clock, audit: AuditSink,
                 config: AttestationConfig,
                 token_signer: Callable[[], Signer | None] | None = None,
                 *, nonce_key: Callable[[], bytes] | None = None) -> None:
        """``token_signer`` and ``nonce_key`` give the cluster's token-signing key and 32-byte
        nonce MAC key (``crypto/service_keys.py``: in the database under the root key, or in
        the HSM); None, or a signer hook answering None: key files under the home directory.
        The nonce key is asked once per process."""
        self._db = db
        self._nonce_key_source = nonce_key
        self._bindings = BindingCache()
        self._token_signer = token_signer
        self._clock = clock
        self._audit_sink = audit
        self._config = config
        self.policy = quote.QuotePolicy()
        self._lock = threading.Lock()
        self._signing_key: Signer | None = None
        self._publishers: ManifestVerifier | None = None
        self._ek_roots: tuple[x509.Certificate, ...] | None = None
        self._ek_intermediates: tuple[bytes, ...] = ()
        self._ek_cache: OrderedDict[str, VerifiedChain] = OrderedDict()
        self._nonce_secret: bytes | None = None
        self._verifications = 0
        self._trust_pinned = False
        self._trust_stamp: tuple[tuple[object, ...], ...] | None = None

    # -- trust configuration ---------------------------------------------------------------

    def configure_trust(
        self,
        *,
        publishers: TrustStore | None = None,
        ek_roots: Sequence[x509.Certificate] | None = None,
        ek_intermediates: Sequence[x509.Certificate] = (),
    ) -> None:
        """Replace the trust configuration in code (embedding, tests); clears the caches.

        Trust set in code is kept until :meth:`reload_trust`: the trust directory is no
        longer watched.
        """
        with self._lock:
            self._trust_pinned = True
            if publishers is not None:
                self._publishers = ManifestVerifier(publishers)
            if ek_roots is not None:
                self._ek_roots = tuple(ek_roots)
                self._ek_intermediates = tuple(
                    c.public_bytes(serialization.Encoding.DER) for c in ek_intermediates
                )
            self._ek_cache.clear()

    def reload_trust(self) -> None:
        """Forget the trust configuration; the next use reads the trust directory again."""
        with self._lock:
            self._trust_pinned = False
            self._trust_stamp = None
            self._publishers = None
            self._ek_roots = None
            self._ek_intermediates = ()
            self._ek_cache.clear()

    def _watch_trust_files(self) -> None:
        """Reload the trust configuration when a file of the trust directory changed.

        Called once at the start of every operation that relies on trust.  Each worker process
        compares the directory's listing (names, sizes, modification times, inodes) with the
        one it loaded: a revocation list, CRL or root an operator adds, edits or removes takes
        effect on the next request in every worker, without a restart or a signal.  A listing
        costs a few ``stat`` calls, far below one verification.
        """
        if self._trust_pinned:
            return
        stamp = _trust_stamp(self._config.trust_dir)
        with self._lock:
            if stamp == self._trust_stamp:
                return
            self._trust_stamp = stamp
            self._publishers = None
            self._ek_roots = None
            self._ek_intermediates = ()
            self._ek_cache.clear()

    def _manifest_verifier(self) -> ManifestVerifier:
        with self._lock:
            if self._publishers is None:
                base = self._config.trust_dir
                self._publishers = ManifestVerifier(TrustStore.from_directory(base))
            return self._publishers

    def _ek_trust(self) -> tuple[tuple[x509.Certificate, ...], tuple[bytes, ...]]:
        with self._lock:
            if self._ek_roots is None:
                base = self._config.trust_dir / "trust-roots"
                self._ek_roots = _pem_dir(base / "tpm-manufacturers")
                self._ek_intermediates = tuple(
                    c.public_bytes(serialization.Encoding.DER)
                    for c in _pem_dir(base / "tpm-intermediates")
                )
            return self._ek_roots, self._ek_intermediates

    def _verify_ek(self, chain_der: Sequence[bytes], now: datetime) -> VerifiedChain:
        """The EK certificate chains to a TPM-manufacturer root and nothing on the path is
        revoked; cached by chain digest and the revocation data's fingerprint.

        The revocation data (serials, fingerprints, CRLs) is the same the publisher chains are
        checked against: one trust directory revokes for every chain.
        """
        revocations = self._manifest_verifier().trust
        key = hashlib.sha256(
            revocations.fingerprint.encode()
            + b"".join(hashlib.sha256(c).digest() for c in chain_der)
        ).hexdigest()
        with self._lock:
            cached = self._ek_cache.get(key)
            if cached is not None:
                self._ek_cache.move_to_end(key)
        if cached is not None and cached.valid_from <= now < cached.valid_until:
            return cached
        roots, pool = self._ek_trust()
        if not roots:
            raise CertificateChainError("no TPM-manufacturer trust root is configured")
        # The EK certificate profile marks key use by key type (keyEncipherment for RSA,
        # keyAgreement for ECC); the TCG EKU, when present, must say EK certificate.
        chain = verify_chain(
            chain_der[0],
            [*chain_der[1:], *pool],
            roots,
            now,
            required_key_usage=(),
            required_eku=TCG_EK_CERTIFICATE,
            max_intermediates=8 + len(pool),
            revoked_serials=revocations.revocations.serials,
            revoked_fingerprints=revocations.revocations.fingerprints,
            crls=revocations.crls,
        )
        with self._lock:
            self._ek_cache[key] = chain
            while len(self._ek_cache) > _EK_CACHE_MAX:
                self._ek_cache.popitem(last=False)
        return chain

    # -- the token-signing key -------------------------------------------------------------

    def _key(self) -> Signer:
        with self._lock:
            if self._signing_key is None:
                # The cluster's key when there is a hook (it imports an old key file itself:
                # relying parties pinned that key); else this node's own file.
                shared = self._token_signer() if self._token_signer else None
                self._signing_key = shared or _load_or_create_key(
                    self._config.home / SIGNING_KEY_FILE)
            return self._signing_key

    def _nonce_key(self) -> bytes:
        with self._lock:
            if self._nonce_secret is None:
                if self._nonce_key_source is not None:
                    secret = self._nonce_key_source()
                    if len(secret) != 32:
                        raise AttestationKeyUnavailableError(
                            "the attestation nonce key is not 32 bytes")
                    self._nonce_secret = secret
                else:
                    self._nonce_secret = _load_or_create_secret(
                        self._config.home / NONCE_KEY_FILE
                    )
            return self._nonce_secret

    def public_jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWK Set relying parties verify attestation tokens with."""
        return {"keys": [token.jwk(self._key().public_key())]}

    def token_keys(self) -> dict[str, Ed25519PublicKey]:
        public = self._key().public_key()
        return {token.jwk_thumbprint(public): public}

    def verify_token(self, presented: str, *, tenant_id: str) -> token.TokenClaims:
        """Verify an attestation token of ``tenant_id`` at the service's current time."""
        return token.verify_token(
            presented, self.token_keys(), self._clock.now(), tenant_id=tenant_id
        )

    # -- nonces ----------------------------------------------------------------------------

    def issue_nonce(self, who: Principal, *, ak_name: bytes | None = None) -> IssuedNonce:
        """A fresh single-use 32-byte nonce for ``who``'s tenant (and, given ``ak_name``, for
        that AK only).

        Nothing is stored and nothing is audited here: the nonce authenticates its tenant, AK
        and expiry itself (see :mod:`sandboxsec.attestation.nonce`), and the verdict that
        consumes it records it, in its audit entry, in the same transaction.  A nonce that is
        never answered changes no state, so there is nothing of it to audit.
        """
        now = self._clock.now()
        expires = now + timedelta(seconds=self._config.nonce_ttl_seconds)
        value = nonces.mint_nonce(self._nonce_key(), who.tenant_id, expires, ak_name=ak_name)
        return IssuedNonce(nonce=value, expires_at=nonces.nonce_expiry(value))

    def _consume_nonce(
        self, s: Session, who: Principal, nonce: bytes, state: NonceState, now: datetime
    ) -> NonceState:
        """Consume an authenticated nonce atomically (the first insert wins).

        ``state`` is what :func:`~sandboxsec.attestation.nonce.check_nonce` said; only a
        ``FRESH`` nonce is recorded (anything else was never this service's to consume).
        """
        if state is not NonceState.FRESH:
            return state
        values = {
            "id": nonce.hex(),
            "tenant_id": who.tenant_id,
            "consumed_by": who.key_id,
            "consumed_at": now,
            "expires_at": nonces.nonce_expiry(nonce),
        }
        # RETURNING says whether this statement inserted the row (rowcount is not reliable
        # for ON CONFLICT DO NOTHING across drivers).  Core statements built once, on the
        # session's connection: the ORM path costs more than the statement here.
        stmt = _CONSUME_PG if self._db.is_postgres else _CONSUME_SQLITE
        won = s.connection().execute(stmt, values).first()
        return NonceState.FRESH if won is not None else NonceState.REPLAYED

    def _purge_nonces(self, now: datetime) -> None:
        # Housekeeping: consumed nonces are only needed until they expire.
        table: Any = AttestationNonce
        try:
            with self._db.session() as s:
                s.execute(delete(AttestationNonce).where(table.expires_at < now))
        except SandboxSecError:
            return  # the next purge retries; nothing is decided here

    # -- AK binding ------------------------------------------------------------------------

    def ak_challenge(
        self,
        who: Principal,
        *,
        ak_public: bytes,
        ek_certificate: bytes,
        ek_public: bytes | None = None,
        ek_intermediates: Sequence[bytes] = (),
    ) -> AkChallenge:
        """Start binding an AK: check the AK and the EK chain, then MakeCredential.

        Refusals raise typed errors and are audited with their reason code.
        """
        now = self._clock.now()
        self._watch_trust_files()
        try:
            # 1. The AK is a restricted fixedTPM signing key; its name is what gets bound.
            ak = quote.parse_ak_public(ak_public)
            # 2. The EK certificate chains to a trusted TPM manufacturer.
            if not ek_certificate:
                raise EkCertificateMissingError("an EK certificate is required")
            chain = self._verify_ek([ek_certificate, *ek_intermediates], now)
            # 3. Credential protection under the certified EK, bound to the AK's name.
            profile = akbind.ek_profile(chain.leaf, ek_public)
            secret = secrets.token_bytes(CREDENTIAL_BYTES)
            credential = akbind.make_credential(profile, ak.name, secret)
        except SandboxSecError as exc:
            self._refuse(who, AuditEvent.AK_CREDENTIAL_ISSUE, exc)
            raise
        credential_id = new_id("akc")
        expires = now + timedelta(seconds=self._config.nonce_ttl_seconds)
        with self._db.session() as s:
            s.add(
                AkCredential(
                    id=credential_id,
                    tenant_id=who.tenant_id,
                    ak_name=ak.name_hex,
                    ak_public=ak_public.hex(),
                    ek_fingerprint=hashlib.sha256(ek_certificate).hexdigest(),
                    ek_certificate=",".join(
                        _b64(c) for c in [ek_certificate, *ek_intermediates]
                    ),
                    secret_digest=hashlib.sha256(secret).hexdigest(),
                    created_at=now,
                    expires_at=expires,
                )
            )
            self._audit(
                s, who, AuditEvent.AK_CREDENTIAL_ISSUE, "success",
                object_ids={"credential_id": credential_id, "ak_name": ak.name_hex},
                body={"ek_fingerprint": hashlib.sha256(ek_certificate).hexdigest(),
                      "ek_issuer": chain.path[1].subject.rfc4514_string()
                      if len(chain.path) > 1 else chain.subject},
            )
        return AkChallenge(
            credential_id=credential_id,
            credential_blob=credential.credential_blob,
            encrypted_secret=credential.encrypted_secret,
            ak_name=ak.name_hex,
            expires_at=expires,
        )

    def ak_activate(self, who: Principal, *, credential_id: str, secret: bytes
                    ) -> BoundAkView:
        """Finish binding: the returned secret proves the AK and EK share one TPM.

        A challenge is answered once: a wrong secret burns it too, so it cannot be guessed.
        """
        now = self._clock.now()
        failure: SandboxSecError | None = None
        bound: BoundAk | None = None
        with self._db.session() as s:
            cred = get_scoped(s, AkCredential, who.tenant_id, credential_id,
                              for_update=True, what="AK credential")
            if cred.used_at is not None:
                failure = AkCredentialUsedError("this credential challenge was already answered")
            elif now >= cred.expires_at:
                failure = AkCredentialExpiredError("the credential challenge expired")
            else:
                cred.used_at = now
                s.add(cred)
                try:
                    akbind.check_activation(bytes.fromhex(cred.secret_digest), secret)
                except SandboxSecError as exc:
                    failure = exc
            if failure is None:
                bound = self._bind(s, who, cred, now)
            self._audit(
                s, who, AuditEvent.AK_CREDENTIAL_ACTIVATE,
                "success" if failure is None else "failure",
                reason=failure.reason if failure else None,
                object_ids={"credential_id": credential_id, "ak_name": cred.ak_name},
            )
        if failure is not None:
            raise failure
        assert bound is not None
        return BoundAkView(bound.tenant_id, bound.ak_name, bound.ek_fingerprint)

    @staticmethod
    def _bind(s: Session, who: Principal, cred: AkCredential, now: datetime) -> BoundAk:
        table: Any = BoundAk
        existing = s.exec(
            select(BoundAk).where(table.tenant_id == who.tenant_id, table.ak_name == cred.ak_name)
        ).first()
        if existing is not None:
            if existing.ek_fingerprint != cred.ek_fingerprint:
                # One AK name cannot move to another EK: that would be a second TPM.
                raise AkNameMismatchError("this AK is already bound to another EK")
            return existing
        bound = BoundAk(
            id=new_id("ak"),
            tenant_id=who.tenant_id,
            ak_name=cred.ak_name,
            ak_public=cred.ak_public,
            ek_fingerprint=cred.ek_fingerprint,
            ek_certificate=cred.ek_certificate,
            credential_id=cred.id,
            bound_at=now,
        )
        s.add(bound)
        try:
            s.flush()
        except IntegrityError:
            raise AkCredentialUsedError("this AK was bound concurrently") from None
        return bound

    # -- verification ----------------------------------------------------------------------

    def verify(self, who: Principal, evidence: Evidence) -> Verdict:
        """Verify evidence and, when affirming, issue a token; the verdict is audited.

        The nonce is consumed by this submission whatever the verdict.  The clock state of a
        bound AK advances only on a fully valid (affirming) quote.

        One transaction per verdict: the nonce's consumption, the AK's clock, the verdict's
        record and its audit entry commit together or not at all.  The checks run before it,
        on the nonce as its MAC says and on this process's snapshot of the AK's binding
        (:mod:`sandboxsec.attestation.bindings`); the transaction then proves both still hold
        (the nonce insert wins, the clock update matches the snapshot) or judges again on the
        locked state, so the outcome is exactly as if everything had run under the lock.
        """
        now = self._clock.now()
        self._watch_trust_files()
        signing_key = self._key()  # fail closed before anything is consumed
        nonce_key = self._nonce_key()
        # Pure, cacheable work happens before the transaction to keep row locks short.
        manifest: VerifiedManifest | SandboxSecError
        try:
            manifest = self._manifest_verifier().verify(evidence.image_manifest, now)
        except SandboxSecError as exc:
            manifest = exc
        try:
            ak_name_bytes: bytes | None = quote.parse_ak_public(evidence.ak_public).name
        except SandboxSecError:
            ak_name_bytes = None
        ak_name = ak_name_bytes.hex() if ak_name_bytes is not None else None
        attestation_id = new_id("att")
        token_expires = now + timedelta(seconds=self._config.token_ttl_seconds)
        checked = nonces.check_nonce(nonce_key, who.tenant_id, evidence.nonce, now,
                                     ak_name=ak_name_bytes)
        snapshot = self._snapshot(who.tenant_id, ak_name)
        result = self._judge(who, evidence, now, manifest, checked, snapshot)
        with self._db.session() as s:
            # 1. Consume the nonce (atomic; a replay loses here even across processes).
            state = self._consume_nonce(s, who, evidence.nonce, checked, now)
            if state is not checked:
                result = self._judge(who, evidence, now, manifest, state, snapshot)
            # 2. The AK's clock: an affirming quote advances it if the row is still what the
            #    snapshot says (one statement); otherwise judge again on the locked row.
            stored = self._settle_binding(s, who, evidence, now, manifest, state, snapshot,
                                          ak_name, result)
            if stored is not None:
                result, snapshot = stored
            # 3. Record and audit the verdict in the same transaction.
            s.connection().execute(
                _INSERT_RECORD,
                dict(
                    id=attestation_id,
                    tenant_id=who.tenant_id,
                    status=result.status,
                    failures=",".join(result.failure_codes)[:8192],
                    image_name=result.image_name[:500],
                    image_digest=result.image_digest[:80],
                    ak_name=result.ak_name[:140],
                    nonce=evidence.nonce.hex()[:96],
                    created_at=now,
                    token_expires_at=token_expires if result.affirming else None,
                )
            )
            self._audit(
                s, who, AuditEvent.ATTESTATION_VERDICT,
                "success" if result.affirming else "failure",
                reason=result.failures[0].code if result.failures else None,
                object_ids={"attestation_id": attestation_id, "ak_name": result.ak_name,
                            "nonce": evidence.nonce.hex()[:96]},
                body={"status": result.status, "failures": list(result.failure_codes),
                      "image_digest": result.image_digest,
                      "unknown_event_types": list(result.unknown_event_types)},
            )
            # 4. Sign the token before the verdict commits: if the key (an HSM) fails now, the
            #    transaction rolls back and nothing is consumed or recorded, so the caller
            #    retries with the same nonce.  The cost is one signature inside the lock.
            issued: str | None = None
            if result.affirming:
                issued = token.sign_token(
                    token.TokenClaims(
                        attestation_id=attestation_id,
                        tenant_id=who.tenant_id,
                        status=result.status,
                        trust_vector=result.trust_vector,
                        image_name=result.image_name,
                        image_digest=result.image_digest,
                        ak_name=result.ak_name,
                        nonce=result.nonce,
                        issued_at=now,
                        expires_at=token_expires,
                        kid="",
                        jkt=result.session_key_jkt,
                    ),
                    signing_key,
                )
        # Committed: the snapshot is the stored state now (or the row is gone).
        if ak_name is not None:
            if snapshot is None:
                self._bindings.forget(who.tenant_id, ak_name)
            else:
                self._bindings.put(snapshot)
        self._verifications += 1
        if self._verifications % _PURGE_EVERY == 0:
            self._purge_nonces(now)
        return Verdict(
            attestation_id=attestation_id,
            result=result,
            token=issued,
            token_expires_at=token_expires if issued else None,
        )

    def _snapshot(self, tenant_id: str, ak_name: str | None) -> BindingSnapshot | None:
        """This process's snapshot of the AK's binding, read (without a lock) on a miss."""
        if ak_name is None:
            return None
        cached = self._bindings.get(tenant_id, ak_name)
        if cached is not None:
            return cached
        with self._db.connection() as conn:
            loaded = load_binding(conn, tenant_id, ak_name, lock=False,
                                  postgres=self._db.is_postgres)
        if loaded is not None:
            self._bindings.put(loaded)
        return loaded

    def _settle_binding(
        self,
        s: Session,
        who: Principal,
        evidence: Evidence,
        now: datetime,
        manifest: VerifiedManifest | SandboxSecError,
        state: NonceState,
        snapshot: BindingSnapshot | None,
        ak_name: str | None,
        result: AttestationResult,
    ) -> tuple[AttestationResult, BindingSnapshot | None] | None:
        """Make the verdict agree with the stored binding, inside the verdict's transaction.

        None when the snapshot was current (and, for an affirming verdict, the clock was
        advanced); else the verdict judged again on the locked row, and that row.
        """
        if (result.affirming and snapshot is not None and result.clock is not None
                and advances(snapshot, result.clock)
                and advance_clock(s.connection(), snapshot, result.clock, conditional=True)):
            return result, snapshot.advanced(result.clock)
        if ak_name is None:
            return None
        locked = load_binding(s.connection(), who.tenant_id, ak_name, lock=True,
                              postgres=self._db.is_postgres)
        if (locked.state() if locked else None) == (snapshot.state() if snapshot else None) \
                and not result.affirming:
            return None
        result = self._judge(who, evidence, now, manifest, state, locked)
        if (result.affirming and locked is not None and result.clock is not None
                and advances(locked, result.clock)):
            advance_clock(s.connection(), locked, result.clock, conditional=False)
            return result, locked.advanced(result.clock)
        return result, locked

    def _judge(
        self,
        who: Principal,
        evidence: Evidence,
        now: datetime,
        manifest: VerifiedManifest | SandboxSecError,
        state: NonceState,
        bound: BindingSnapshot | None,
    ) -> AttestationResult:
        """Every check of the pure verifier, on one view of the nonce and the AK binding."""
        binding, ek_error = None, None
        if bound is not None:
            binding = bound.binding()
            try:
                self._verify_ek(bound.ek_chain, now)
            except SandboxSecError as exc:
                ek_error = exc
        return verify_evidence(
            evidence,
            VerifierContext(
                tenant_id=who.tenant_id,
                now=now,
                nonce_state=state,
                binding=binding,
                manifest=manifest,
                ek_chain_error=ek_error,
                policy=self.policy,
                max_event_log_bytes=self._config.max_event_log_bytes,
            ),
        )

    def check_standing(self, tenant_id: str, ak_name: str, image_digest: str) -> None:
        """Raise if what a token was issued on has since been revoked.

        A session starts only while the AK's bound EK still chains, unrevoked, to a trusted
        manufacturer and the image digest is not revoked: a revocation in the trust directory
        stops sessions from tokens issued before it.
        """
        now = self._clock.now()
        self._watch_trust_files()
        if image_digest in self._manifest_verifier().trust.revocations.image_digests:
            raise ImageDigestRevokedError("the attested image has been revoked")
        with self._db.connection() as conn:
            bound = load_binding(conn, tenant_id, ak_name, lock=False,
                                 postgres=self._db.is_postgres)
        if bound is None:
            self._bindings.forget(tenant_id, ak_name)
            raise AkNotBoundError("the attested AK is no longer bound")
        self._verify_ek(bound.ek_chain, now)

    def claim_for_session(
        self, s: Session, tenant_id: str, attestation_id: str, session_id: str
    ) -> bool:
        """Mark the verdict as used by ``session_id``; False if it was used or is unknown."""
        table: Any = AttestationRecord
        won = s.execute(
            update(AttestationRecord)
            .where(
                table.id == attestation_id,
                table.tenant_id == tenant_id,
                table.status == "affirming",
                table.session_id.is_(None),
            )
            .values(session_id=session_id)
        )
        return getattr(won, "rowcount", 0) == 1

    # -- audit helpers ---------------------------------------------------------------------

    def _audit(
        self,
        s: Session | None,
        who: Principal,
        event: AuditEvent,
        outcome: str,
        *,
        reason: str | None = None,
        object_ids: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        self._audit_sink.append(
            AuditRecord.by(who, event, outcome, reason=reason, object_ids=object_ids,
                           body=body),
            session=s,
        )

    def _refuse(self, who: Principal, event: AuditEvent, exc: SandboxSecError) -> None:
        # A refusal is recorded too; if even that cannot be written the caller gets a 503.
        self._audit(None, who, event, "failure", reason=exc.reason)


_TRUST_SUBDIRS: Final = ("trust-roots/publishers", "trust-roots/tpm-manufacturers",
                          "trust-roots/tpm-intermediates", "revocations")


def _trust_stamp(base: Path) -> tuple[tuple[object, ...], ...]:
    """What the trust directory's files look like now (name, size, mtime, inode each).

    On every verification: plain ``str`` paths and ``os.scandir`` (one ``stat`` per file),
    no ``pathlib``, so the watch costs a few system calls and little Python.
    """
    out: list[tuple[object, ...]] = []
    for sub, directory in _trust_dirs(str(base)):
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=_entry_name)
        except OSError:
            out.append((sub,))
            continue
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:
                continue
            out.append((sub, entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _entry_name(entry: os.DirEntry[str]) -> str:
    return entry.name


@lru_cache(maxsize=16)
def _trust_dirs(base: str) -> tuple[tuple[str, str], ...]:
    return tuple((sub, os.path.join(base, sub)) for sub in _TRUST_SUBDIRS)


def _pem_dir(directory: Path) -> tuple[x509.Certificate, ...]:
    if not directory.is_dir():
        return ()
    out: list[x509.Certificate] = []
    for path in sorted(directory.glob("*.pem")):
        out.extend(load_pem_certificates(path.read_bytes(), source=str(path)))
    return tuple(out)


def _load_or_create_secret(path: Path) -> bytes:
    """The 32-byte nonce MAC key, created on first use."""
    try:
        data = create_once(path, secrets.token_bytes(32))
    except OSError as exc:
        raise AttestationKeyUnavailableError(
            f"cannot read or create the attestation nonce key ({type(exc).__name__})"
        ) from None
    if len(data) != 32:
        raise AttestationKeyUnavailableError("the attestation nonce key is not 32 bytes")
    return data


def _load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """Load the token-signing key, creating it (mode 0600) on first use."""
    try:
        pem = create_once(
            path,
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (OSError, ValueError) as exc:
        raise AttestationKeyUnavailableError(
            f"cannot read or create the attestation signing key ({type(exc).__name__})"
        ) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise AttestationKeyUnavailableError("the attestation signing key is not Ed25519")
    return loaded


def decode_evidence_field(value: str, what: str) -> bytes:
    """Strict standard base64 of one evidence field, or :class:`EvidenceMalformedError`."""
    try:
        return b64decode_strict(value)
    except (ValueError, TypeError):
        raise EvidenceMalformedError(f"{what} is not canonical standard base64") from None
