"""Typed, frozen results of the API calls (parsed once, at the boundary).

Each type has ``from_json``; unknown members are ignored (the service only ever adds
fields) and kept in ``raw`` for callers that need what this version does not know yet.
Times stay RFC 3339 strings, as the service sends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self

__all__ = [
    "ApiKey",
    "ApiKeyCreated",
    "Approval",
    "AuditKey",
    "Checkpoint",
    "Decision",
    "GrantCheck",
    "GrantClaims",
    "KeyStatus",
    "Policy",
    "PolicyCheck",
    "RecordCreated",
    "SessionInfo",
    "TrajectoryRecord",
    "Verdict",
    "WhoAmI",
]




@dataclass(frozen=True)
class Verdict:
    """The service's attestation verdict; ``contraindicated`` is an answer, not an error."""

    status: str
    failures: tuple[tuple[str, str], ...]
    token: str | None
    attestation_id: str
    ak_name: str
    image_digest: str
    trust_vector: dict[str, int]
    unknown_event_types: tuple[str, ...]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def affirming(self) -> bool:
        """Whether the sandbox may start a session with :attr:`token`."""
        return self.status == "affirming" and self.token is not None

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> Self:
        return cls(status=v["status"],
                   failures=tuple((f["code"], f["message"]) for f in v.get("failures", ())),
                   token=v.get("token"), attestation_id=v.get("attestation_id", ""),
                   ak_name=v.get("ak_name", ""), image_digest=v.get("image_digest", ""),
                   trust_vector=dict(v.get("trust_vector", {})),
                   unknown_event_types=tuple(v.get("unknown_event_types", ())), raw=v)


@dataclass(frozen=True)
class SessionInfo:
    """An agent session."""

    session_id: str
    expires_at: str
    image_name: str
    image_digest: str
    attested: bool
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, s: dict[str, Any]) -> Self:
        return cls(session_id=s["session_id"], expires_at=s["expires_at"],
                   image_name=s["image_name"], image_digest=s["image_digest"],
                   attested=bool(s["attested"]), raw=s)


@dataclass(frozen=True)
class Decision:
    """The policy's answer to one action request: ``allow``, ``deny`` or
    ``approval_required`` (then ``approval_id`` and ``short_code`` to show the person)."""

    decision: str
    rule_id: str
    reason: str
    decision_id: str
    params_hash: str
    short_code: str
    approval_id: str | None = None
    approval_url: str | None = None
    grant: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Self:
        return cls(decision=d["decision"], rule_id=d["rule_id"], reason=d["reason"],
                   decision_id=d["decision_id"], params_hash=d["params_hash"],
                   short_code=d["short_code"], approval_id=d.get("approval_id"),
                   approval_url=d.get("approval_url"), grant=d.get("grant"), raw=d)


@dataclass(frozen=True)
class Approval:
    """An approval request as the caller's key may see it (the grant only for its agent)."""

    id: str
    state: str
    action: str
    resource: str
    params: dict[str, Any]
    params_hash: str
    short_code: str
    session_id: str = ""
    grant: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def pending(self) -> bool:
        return self.state == "pending"

    @classmethod
    def from_json(cls, a: dict[str, Any]) -> Self:
        return cls(id=a["id"], state=a["state"], action=a["action"], resource=a["resource"],
                   params=dict(a["params"]), params_hash=a["params_hash"],
                   short_code=a["short_code"], session_id=a.get("session_id", ""),
                   grant=a.get("grant"), raw=a)


@dataclass(frozen=True)
class GrantCheck:
    """The online check of a grant: valid (and now used up) or the reason it is not."""

    valid: bool
    code: str | None = None
    message: str | None = None
    grant_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class GrantClaims:
    """What a grant binds, as decoded and checked offline (single use is not checked)."""

    grant_id: str
    tenant_id: str
    session_id: str
    action: str
    resource: str
    params_hash: str
    approval_id: str | None
    issued_at: str
    expires_at: str
    key_id: str


@dataclass(frozen=True)
class RecordCreated:
    """A stored trajectory record."""

    record_id: str
    session_id: str
    size: int
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> Self:
        return cls(record_id=r["record_id"], session_id=r["session_id"], size=int(r["size"]),
                   raw=r)


@dataclass(frozen=True)
class TrajectoryRecord:
    """A decrypted trajectory record (admin)."""

    record_id: str
    session_id: str
    kind: str
    data: bytes
    meta: dict[str, Any]
    created_at: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Checkpoint:
    """The latest signed checkpoint of the tenant's audit log."""

    log_id: str
    origin: str
    size: int
    root_hash: str
    note: str
    key_name: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, c: dict[str, Any]) -> Self:
        return cls(log_id=c["log_id"], origin=c["origin"], size=int(c["size"]),
                   root_hash=c["root_hash"], note=c["note"], key_name=c["key_name"], raw=c)


@dataclass(frozen=True)
class AuditKey:
    """The audit log's public key, input of offline verification."""

    key_name: str
    public_key_pem: str
    verifier_key: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, k: dict[str, Any]) -> Self:
        return cls(key_name=k["key_name"], public_key_pem=k["public_key_pem"],
                   verifier_key=k["verifier_key"], raw=k)


@dataclass(frozen=True)
class WhoAmI:
    """The tenant and role of the key in use."""

    tenant_id: str
    tenant_name: str
    key_id: str
    role: str

    @classmethod
    def from_json(cls, w: dict[str, Any]) -> Self:
        return cls(tenant_id=w["tenant_id"], tenant_name=w["tenant_name"],
                   key_id=w["key_id"], role=w["role"])


@dataclass(frozen=True)
class ApiKey:
    """An API key of the tenant (never the secret)."""

    key_id: str
    role: str
    label: str
    created_at: str
    revoked_at: str | None

    @classmethod
    def from_json(cls, k: dict[str, Any]) -> Self:
        return cls(key_id=k["key_id"], role=k["role"], label=k.get("label", ""),
                   created_at=k["created_at"], revoked_at=k.get("revoked_at"))


@dataclass(frozen=True)
class ApiKeyCreated:
    """A new API key: ``key`` is shown once and never again."""

    key_id: str
    role: str
    key: str = field(repr=False)


@dataclass(frozen=True)
class KeyStatus:
    """The tenant's key versions (envelope encryption)."""

    tenant_id: str
    current_version: int
    min_decryption_version: int
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, k: dict[str, Any]) -> Self:
        return cls(tenant_id=k["tenant_id"], current_version=int(k["current_version"]),
                   min_decryption_version=int(k["min_decryption_version"]), raw=k)


@dataclass(frozen=True)
class Policy:
    """The tenant's action policy and its version (send it back to replace it safely)."""

    version: int
    rule_count: int
    is_default: bool
    text: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> Self:
        return cls(version=int(p["version"]), rule_count=int(p["rule_count"]),
                   is_default=bool(p["is_default"]), text=p["text"], raw=p)


@dataclass(frozen=True)
class PolicyCheck:
    """Whether a policy text would be accepted; if not, the reason code and message."""

    valid: bool
    rule_count: int
    code: str | None = None
    message: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
