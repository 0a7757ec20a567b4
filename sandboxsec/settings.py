"""One settings object, read from ``SANDBOXSEC_*`` environment variables.

Defaults are the embedded single-machine set-up (SQLite file and local root key under
``home``).  Each domain keeps its settings in its own marked section below.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["AuditWitness", "Settings"]


class AuditWitness(BaseModel):
    """One witness the service submits checkpoints to."""

    url: str = Field(description="The add-checkpoint URL, e.g. https://w.example/add-checkpoint.")
    key: str = Field(description="The witness's verifier key name+keyid+base64 (type 0x04).")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("a witness URL is http:// or https://")
        return v

    @field_validator("key")
    @classmethod
    def _witness_key(cls, v: str) -> str:
        from sandboxsec.audit.cosignature import parse_witness_key

        parse_witness_key(v)
        return v.strip()

_DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "postgresql+psycopg")


class Settings(BaseSettings):
    """Configuration of one sandboxsec service.  See ``docs/configuration.md``."""

    model_config = SettingsConfigDict(env_prefix="SANDBOXSEC_", extra="ignore")

    # --- core ---
    home: Path = Field(
        default=Path(".sandboxsec"),
        description="State directory: SQLite file, local root key, service signing keys.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; unset means the SQLite file <home>/sandboxsec.db. "
        "postgresql:// URLs use psycopg 3.",
    )
    db_pool_size: int = Field(default=10, ge=1, le=200)
    db_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="Connect/lock timeout; past it requests fail closed."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest accepted HTTP request body."
    )
    max_json_depth: int = Field(default=32, ge=4, le=256)
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    rate_limit_per_second: float = Field(
        default=2000.0, ge=0,
        description="Requests a second one API key may make on average, per worker process "
        "(0: no limit); over it the answer is 429 rate_limited with Retry-After.",
    )
    rate_limit_burst: int = Field(
        default=0, ge=0, description="Requests one key may make at once (0: twice the rate).")

    # --- attestation ---
    nonce_ttl_seconds: int = Field(default=120, ge=5, le=3600)
    attestation_token_ttl_seconds: int = Field(default=300, ge=10, le=3600)
    trust_dir: Path | None = Field(
        default=None,
        description="Trust roots and revocation lists (default: <home>/trust, see attestation/).",
    )

    # --- sessions ---
    session_ttl_seconds: int = Field(default=8 * 3600, ge=60)
    # --- sessions: the TPM-held session key and its proofs (see docs/attestation.md) ---
    public_url: str | None = Field(
        default=None,
        description="The URL clients reach the service at (scheme, host, port, path prefix); "
        "session proofs name it in htu.  `sandboxsec serve` defaults it to its own address.",
    )
    require_session_key: bool = Field(
        default=True,
        description="Start sessions only from a token with a certified TPM-held session key. "
        "False allows unbound sessions: their id is then a bearer handle (not for production).",
    )
    dpop_max_age_seconds: int = Field(default=60, ge=5, le=600)
    dpop_clock_skew_seconds: int = Field(default=5, ge=0, le=120)
    dpop_require_nonce: bool = Field(
        default=False,
        description="Require a server nonce (RFC 9449 DPoP-Nonce) in every session proof, so "
        "freshness is judged on the service's clock (docs/attestation.md).",
    )
    dpop_nonce_lifetime_seconds: int = Field(default=300, ge=10, le=3600)
    dpop_parallel_signature_check: bool = Field(
        default=True,
        description="Check a proof's signature on a thread of its own while the action is "
        "decided; the decision commits only once it verified (docs/attestation.md).",
    )

    # --- policy ---
    approval_ttl_seconds: int = Field(default=300, ge=10, le=86400)
    grant_ttl_seconds: int = Field(default=300, ge=10, le=3600)
    approval_wait_max_seconds: float = Field(default=60.0, gt=0, le=600)
    policy_cache_size: int = Field(default=16384, ge=16)
    # --- policy: approval webhook (optional; see docs/policy.md) ---
    approval_webhook_url: str | None = Field(
        default=None, description="POSTed (HMAC-signed) when an approval request is created."
    )
    approval_webhook_secret: str | None = Field(default=None, repr=False)
    approval_webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    approval_recheck_seconds: float = Field(
        default=1.0, gt=0, le=30,
        description="SQLite only: waiters re-read the database this often.",
    )

    # --- people: passkeys, sign-in, routing (see docs/policy.md "People") ---
    webauthn_rp_id: str = Field(
        default="localhost",
        description="WebAuthn relying party id: the registrable domain passkeys are bound to.",
    )
    webauthn_rp_name: str = Field(default="sandboxsec", max_length=64)
    public_origin: str = Field(
        default="http://localhost:8000",
        description="The exact origin people open the enrolment and approval pages on; "
        "assertions from any other origin are refused (never taken from the Host header).",
    )
    enrolment_ttl_seconds: int = Field(default=72 * 3600, ge=60, le=30 * 86400)
    person_session_ttl_seconds: int = Field(default=1800, ge=60, le=86400)
    webauthn_challenge_ttl_seconds: int = Field(default=120, ge=10, le=600)
    passkey_rate_limit_per_second: float = Field(
        default=10.0, ge=0,
        description="Requests a second one caller address may make on average to the "
        "enrolment, sign-in and signed-in person routes (they carry no API key), per worker "
        "process (0: no limit); over it the answer is 429 rate_limited.")
    passkey_rate_limit_burst: int = Field(
        default=60, ge=0, description="Such requests one address may make at once.")
    passkey_max_body_bytes: int = Field(
        default=64 * 1024, ge=4096, le=1024 * 1024,
        description="Largest body of those routes (a WebAuthn response is a few kilobytes).")
    # --- webhooks: per-tenant outbox (see docs/policy.md "Notifications") ---
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_backoff_seconds: float = Field(
        default=2.0, gt=0, le=3600, description="First retry delay; doubles per attempt."
    )
    webhook_backoff_max_seconds: float = Field(default=600.0, gt=0, le=86400)
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    webhook_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    webhook_allow_insecure: bool = Field(
        default=False,
        description="Allow http:// and loopback/private webhook targets (development only).",
    )

    # --- crypto ---
    key_provider: Literal["local", "pkcs11"] = "local"
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    pkcs11_token_label: str = "sandboxsec"  # noqa: S105 - a label, not a secret
    pkcs11_pin: str | None = Field(default=None, repr=False)
    pkcs11_key_label: str = "sandboxsec-root"
    tenant_key_dir: Path | None = Field(
        default=None,
        description="Per-tenant key files of the local key provider (default: "
        "<home>/tenant-keys); deleting a tenant destroys its file.",
    )
    max_record_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # --- crypto: key caches and record layout (owned by crypto; see docs/encryption.md) ---
    key_cache_ttl_seconds: float = Field(
        default=60.0, ge=0, le=3600,
        description="How long unwrapped KEKs/DEKs stay cached; 0 disables the cache.",
    )
    key_cache_max_entries: int = Field(default=10_000, ge=16)
    dek_max_messages: int = Field(
        default=1 << 24, ge=1, le=1 << 32,
        description="Records sealed under one data key before a fresh one is made.",
    )
    stream_threshold_bytes: int = Field(
        default=1 << 20, ge=1024,
        description="Records larger than this use the segmented streaming format.",
    )
    stream_segment_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 26)

    # --- audit ---
    audit_checkpoint_every: int = Field(default=1000, ge=1)
    audit_checkpoint_seconds: float = Field(default=10.0, gt=0)
    audit_write_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    audit_deferred_sequencing: bool | None = Field(
        default=None,
        description="Appends in a caller's transaction leave intents sequenced in batches "
        "(no head lock held by callers); unset: on PostgreSQL only.",
    )
    audit_origin: str = "sandboxsec.local/audit"
    auth_failure_audit_per_window: int = Field(
        default=60, ge=1,
        description="Refused API keys audited individually per window and process; more are "
        "counted and reported with the next entry.",
    )
    auth_failure_audit_window_seconds: float = Field(default=60.0, gt=0)
    # --- audit: witnesses (see docs/audit.md, "Witnesses") ---
    audit_witnesses: list[AuditWitness] = Field(
        default_factory=list,
        description='JSON list of {"url": ".../add-checkpoint", "key": "<witness vkey>"}; '
        "every new checkpoint is submitted to each.",
    )
    audit_witness_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    # --- audit (validation) ---
    @field_validator("audit_origin")
    @classmethod
    def _audit_origin_is_a_key_name(cls, v: str) -> str:
        # It is also the signed-note key name of checkpoints: one token, no '+'.
        if not v or any(c.isspace() for c in v) or "+" in v:
            raise ValueError("audit_origin must be non-empty, without spaces or '+'")
        return v

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, v: str | None) -> str | None:
        # An unsupported URL fails here, in one line, not deep in the driver.  The URL is
        # never echoed: it may hold a password.
        if v is None or v == "":
            return None
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in _DATABASE_SCHEMES:
            raise ValueError(
                f"unsupported database URL scheme {scheme or '(none)'!r}: use "
                "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB")
        return v

    @field_validator("webauthn_rp_id")
    @classmethod
    def _rp_id_is_a_domain(cls, v: str) -> str:
        # An IP address is not a valid RP id (browsers throw SecurityError); a bare name is.
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}"
                            r"[a-z0-9])?)*", v) or re.fullmatch(r"[0-9.]+", v):
            raise ValueError("webauthn_rp_id must be a lower-case domain name, not an address")
        return v

    @field_validator("public_origin")
    @classmethod
    def _origin_is_exact(cls, v: str) -> str:
        m = re.fullmatch(r"(https|http)://([a-z0-9.-]+)(:[0-9]{1,5})?", v)
        if m is None:
            raise ValueError("public_origin is scheme://host[:port], lower case, no path")
        if m.group(1) == "http" and m.group(2) != "localhost":
            raise ValueError("public_origin must be https (http only for localhost)")
        return v

    @model_validator(mode="after")
    def _origin_within_rp_id(self) -> Settings:
        # A mismatch would refuse every passkey at run time: refuse the configuration instead.
        self.webauthn_origins()
        return self

    def webauthn_origins(self) -> tuple[str, ...]:
        """The origins assertions may come from (exactly the configured public origin)."""
        host = self.public_origin.split("://", 1)[1].split(":", 1)[0]
        if host != self.webauthn_rp_id and not host.endswith("." + self.webauthn_rp_id):
            # A passkey of RP id X is only usable on X and its subdomains.
            raise ValueError("public_origin's host is not within webauthn_rp_id")
        return (self.public_origin,)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    def resolved_database_url(self) -> str:
        """The database URL in use: the configured one, or the SQLite file under ``home``."""
        if self.database_url:
            url = self.database_url
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return _hosts_in_query(url) if url.startswith("postgresql") else url
        return f"sqlite:///{self.home / 'sandboxsec.db'}"

    def resolved_trust_dir(self) -> Path:
        """Where trust roots and revocation lists are read from."""
        return self.trust_dir if self.trust_dir is not None else self.home / "trust"

    def ensure_home(self) -> Path:
        """Create ``home`` (mode 0700) if missing and return it."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.home


def _hosts_in_query(url: str) -> str:
    """Rewrite libpq's multi-host form ``user@h1:p1,h2:p2/db`` (what operators copy from
    PostgreSQL's documentation for failover) into the ``/db?host=h1:p1&host=h2:p2`` form
    SQLAlchemy parses; single-host URLs are returned unchanged."""
    scheme, rest = url.split("://", 1)
    netloc, _, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if "," not in hosts:
        return url
    path, qsep, query = tail.partition("?")
    params = "&".join(f"host={h}" for h in hosts.split(",") if h)
    return f"{scheme}://{userinfo}{at}/{path}?{params}" + (f"&{query}" if qsep and query else "")
