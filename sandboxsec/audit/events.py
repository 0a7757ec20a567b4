"""Audit event names, ``source:subject:action`` (stored; only ever added, never renamed)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["AuditEvent"]


class AuditEvent(StrEnum):
    """Every kind of security decision or change that lands in the audit log."""

    # tenants and keys of the service itself
    TENANT_CREATE = "admin:tenant:create"
    TENANT_DELETE = "admin:tenant:delete"
    APIKEY_CREATE = "admin:apikey:create"
    APIKEY_REVOKE = "admin:apikey:revoke"
    AUTH_FAILURE = "auth:apikey:reject"
    #: A state-changing or log-reading command an operator ran at the command line.
    OPERATOR_COMMAND = "operator:cli:run"
    # attestation and sessions
    ATTESTATION_CHALLENGE = "attestation:nonce:issue"
    ATTESTATION_VERDICT = "attestation:quote:verdict"
    AK_CREDENTIAL_ISSUE = "attestation:ak:challenge"
    AK_CREDENTIAL_ACTIVATE = "attestation:ak:activate"
    SESSION_START = "session:session:start"
    SESSION_REFUSE = "session:session:refuse"
    SESSION_END = "session:session:end"
    SESSION_PROOF_REFUSE = "session:proof:refuse"
    # policy, approvals and grants
    POLICY_DECISION = "policy:action:decide"
    POLICY_UPDATE = "policy:rules:replace"
    POLICY_UPDATE_REJECT = "policy:rules:reject"
    APPROVAL_REQUEST = "approval:request:create"
    APPROVAL_APPROVE = "approval:request:approve"
    APPROVAL_DENY = "approval:request:deny"
    APPROVAL_EXPIRE = "approval:request:expire"
    APPROVAL_REFUSE = "approval:request:refuse"
    APPROVAL_VOTE = "approval:request:vote"
    GRANT_ISSUE = "grant:grant:issue"
    GRANT_VERIFY = "grant:grant:verify"
    GRANT_REJECT = "grant:grant:reject"
    # people, their passkeys and sign-ins; the owner of a session
    PERSON_CREATE = "people:person:create"
    PERSON_DISABLE = "people:person:disable"
    ENROLMENT_ISSUE = "people:enrolment:issue"
    CREDENTIAL_REGISTER = "people:credential:register"
    CREDENTIAL_REFUSE = "people:credential:refuse"
    CREDENTIAL_REVOKE = "people:credential:revoke"
    SIGNIN_CREATE = "people:signin:create"
    SIGNIN_REFUSE = "people:signin:refuse"
    SESSION_OWNER_ASSIGN = "session:owner:assign"
    # per-tenant webhooks
    WEBHOOK_CREATE = "webhook:endpoint:create"
    WEBHOOK_DISABLE = "webhook:endpoint:disable"
    WEBHOOK_DELIVER = "webhook:delivery:deliver"
    WEBHOOK_RETRY = "webhook:delivery:retry"
    WEBHOOK_FAIL = "webhook:delivery:fail"
    # keys and trajectory data
    KEY_CREATE = "keys:kek:create"
    KEY_ROTATE = "keys:kek:rotate"
    KEY_REWRAP = "keys:dek:rewrap"
    KEY_RETIRE = "keys:kek:retire"
    KEY_SHRED = "keys:tenant:shred"
    TRAJECTORY_WRITE = "trajectory:record:write"
    TRAJECTORY_READ = "trajectory:record:read"
    TRAJECTORY_REFUSE = "trajectory:record:refuse"
    # the audit log's own operations
    AUDIT_CHECKPOINT = "audit:checkpoint:sign"
    AUDIT_EXPORT = "audit:log:export"
    AUDIT_ALARM = "audit:log:alarm"
    AUDIT_ALARM_CLEAR = "audit:alarm:clear"
