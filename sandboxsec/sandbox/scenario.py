"""The end-to-end scenario behind ``sandboxsec demo``: every guarantee, used as a user would.

:func:`run_scenario` starts a fresh service (``sandboxsec serve`` in a subprocess on a free
loopback port, with its own state directory and trust roots), then plays every party:

* the **publisher** makes a CA and a code-signing key and signs the sandbox image
  (``sandboxsec image sign``, checked with ``sandboxsec image verify``);
* the **operator** creates a tenant (``sandboxsec tenant create``);
* the **sandbox** (a swtpm vTPM) measures its boot, binds its AK to its certified EK,
  attests and starts a session; its **agent** records trajectory steps and asks to log in
  to a new domain and to pay 120.00 EUR;
* the **approver** approves the login and denies the payment in the approval page
  (headless Chromium) or, without a browser, through the API exactly as the page does;
* a **downstream** verifies the login grant once; the replay is refused;
* the **admin** reads a trajectory record back; the **auditor** exports the log and checks
  it offline with ``sandboxsec audit verify``.

Each step checks that what happened is what should happen, and says so through ``out``.  The
first surprise stops the run.  Everything started (server, vTPM, browser, temporary
directory) is stopped and removed on every exit path, Ctrl-C included.  The returned
:class:`ScenarioResult` carries the steps, the observed outcomes (``facts``) and the audit
events of the tenant, for tests and callers that want more than the printout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sandboxsec_client import (
    AdminClient,
    ApiError,
    Approval,
    ApproverClient,
    AuditorClient,
    DownstreamClient,
    InsecureSignerWarning,
    SoftwareP256Signer,
)

from sandboxsec.clock import SystemClock
from sandboxsec.policy.canonical import params_hash
from sandboxsec.sandbox.agent import AgentClient
from sandboxsec.sandbox.swtpm import QUOTED_PCRS, SwTpm, start_swtpm

__all__ = [
    "EXPECTED_EVENTS",
    "AuditLine",
    "ScenarioOptions",
    "ScenarioResult",
    "Step",
    "run_scenario",
]

#: Audit events (and outcome, where it matters) the tenant's export must show after a run.
EXPECTED_EVENTS: tuple[tuple[str, str | None], ...] = (
    ("admin:tenant:create", None),
    ("people:person:create", None),
    ("people:credential:register", None),
    ("people:signin:create", None),
    ("session:owner:assign", None),
    ("attestation:ak:activate", None),
    ("attestation:quote:verdict", "affirming"),
    ("session:session:start", None),
    ("session:proof:refuse", None),
    ("trajectory:record:write", None),
    ("policy:action:decide", "approval_required"),
    ("approval:request:create", None),
    ("approval:request:approve", None),
    ("approval:request:deny", None),
    ("approval:request:refuse", None),
    ("grant:grant:issue", None),
    ("grant:grant:verify", None),
    ("grant:grant:reject", None),
    ("trajectory:record:read", None),
    ("audit:log:export", None),
)

CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 # The pages live on http://localhost:PORT (the passkeys' RP id is localhost;
                 # an IP address cannot be one); the service listens on 127.0.0.1.
                 "--host-resolver-rules=MAP localhost 127.0.0.1")
PERSON = {"name": "Alice Example", "handle": "alice"}
LOGIN = {"domain": "online.bank.example", "username": "alice@example.com"}
LOGIN_RESOURCE = "domain:online.bank.example"
PAYMENT = {"amount": "120.00", "currency": "EUR", "payee": "acme-gmbh",
           "iban": "DE89370400440532013000", "reference": "Invoice 2026-118"}
PAYMENT_RESOURCE = "payee:acme-gmbh"
_IMAGE_BYTES = 256 * 1024
_SCREENSHOT_BYTES = 192 * 1024


@dataclass(frozen=True)
class ScenarioOptions:
    """How to run the scenario.

    ``workdir``: where to put everything (default: a new temporary directory, removed at the
    end unless ``keep``; a directory given here is never removed).  ``postgres_url``: run
    the service on this (empty or throwaway) PostgreSQL database instead of an SQLite file.
    ``browser``: approve in headless Chromium when it is available (else through the API,
    with a note).
    """

    workdir: Path | None = None
    keep: bool = False
    postgres_url: str | None = None
    browser: bool = True
    chromium_path: str = "/usr/bin/chromium"
    startup_timeout_seconds: float = 60.0
    wait_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class Step:
    """One step: what it was, whether it behaved as expected, and what was seen."""

    number: int
    title: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class AuditLine:
    """One entry of the tenant's audit export, as the demo prints it."""

    seq: int
    event: str
    outcome: str
    reason: str | None
    status: str | None = None  # body.status where the event has one (attestation verdicts)

    @property
    def shown_outcome(self) -> str:
        if self.status is None or self.status == self.outcome:
            return self.outcome
        return f"{self.outcome}: {self.status}"


@dataclass(frozen=True)
class ScenarioResult:
    """What happened.  ``ok`` only if every step behaved as expected."""

    steps: tuple[Step, ...]
    facts: dict[str, Any]
    events: tuple[AuditLine, ...]
    browser_used: bool
    error: str | None
    workdir: Path | None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.steps) and all(s.ok for s in self.steps)


class _StepFailed(Exception):
    """A step did not behave as expected (already reported through ``out``)."""


def _short(value: str, keep: int = 8) -> str:
    # Ids are "<prefix>_<32 hex>": the prefix and a few characters identify them in a printout.
    prefix, sep, rest = value.partition("_")
    if sep and len(rest) > keep:
        return f"{prefix}_{rest[:keep]}..."
    return value if len(value) <= keep + 4 else f"{value[:keep]}..."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_scenario(options: ScenarioOptions | None = None,
                 out: Callable[[str], None] = print) -> ScenarioResult:
    """Run the whole scenario; print each step through ``out``; never raises on a failed step.

    KeyboardInterrupt propagates (after everything started has been stopped and removed).
    """
    run = _Run(options or ScenarioOptions(), out)
    with contextlib.ExitStack() as stack:
        try:
            run.execute(stack)
        except _StepFailed as exc:
            run.error = str(exc)
        except Exception as exc:
            # An unexpected answer, a broken tool or a browser that timed out: report it as
            # the step that was running (KeyboardInterrupt is not caught: it unwinds).
            run.error = f"{run.current}: {type(exc).__name__}: {exc}"
            out(f"    FAILED while '{run.current}': {type(exc).__name__}: {exc}")
    if run.kept is not None:
        db = " with the same SANDBOXSEC_DATABASE_URL" if run.options.postgres_url else ""
        out(f"kept: {run.kept} (tenant keys in tenant.json; to look around again: "
            f"SANDBOXSEC_HOME={run.kept / 'home'} sandboxsec serve{db})")
    return run.result()


@dataclass
class _Parties:
    """Clients of the service, one per role."""

    agent: AgentClient
    downstream: DownstreamClient
    approver: ApproverClient
    admin: AdminClient
    auditor: AuditorClient


@dataclass
class _Run:
    options: ScenarioOptions
    out: Callable[[str], None]
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    events: list[AuditLine] = field(default_factory=list)
    browser_used: bool = False
    error: str | None = None
    current: str = "setting up"
    kept: Path | None = None
    workdir: Path = Path()
    env: dict[str, str] = field(default_factory=dict)
    base: str = ""
    origin: str = ""
    agent_key: str = field(default="", repr=False)
    server: subprocess.Popen[bytes] | None = None
    server_started: float = 0.0

    # -- reporting ---------------------------------------------------------------------------

    def result(self) -> ScenarioResult:
        return ScenarioResult(steps=tuple(self.steps), facts=dict(self.facts),
                              events=tuple(self.events), browser_used=self.browser_used,
                              error=self.error, workdir=self.kept)

    def begin(self, title: str) -> None:
        self.current = title

    def check(self, ok: bool, detail: str) -> None:
        """Record the current step; stop the run if it did not behave as expected."""
        step = Step(len(self.steps) + 1, self.current, ok, detail)
        self.steps.append(step)
        head = f"{step.number:>2}. {step.title} "
        self.out(f"{head:.<58} {'ok' if ok else 'FAILED'}: {detail}")
        if not ok:
            raise _StepFailed(f"step {step.number} ({step.title}): {detail}")

    def note(self, text: str) -> None:
        self.out(f"    {text}")

    # -- the scenario ----------------------------------------------------------------------------

    def execute(self, stack: contextlib.ExitStack) -> None:
        self._workdir(stack)
        db = "PostgreSQL" if self.options.postgres_url else "SQLite"
        self.out(f"sandboxsec demo: a new tenant's sandbox, from signed image to verified audit "
                 f"({db})")
        self.out(f"work dir {self.workdir}")
        self.out("")

        trust = self.workdir / "home" / "trust"
        self.begin("publisher makes its CA and image-signing key")
        publisher = self.workdir / "publisher"
        pub = _make_publisher(publisher, trust)
        self.check(True, pub)

        self.begin("sandbox vTPM manufactured (swtpm, certified EK)")
        tpm = start_swtpm(self._mkdir("swtpm"))
        stack.callback(tpm.close)
        self.facts["swtpm_pid"] = tpm.process.pid
        _install_tpm_roots(tpm, trust)
        ek = x509.load_der_x509_certificate(tpm.ek_certificate())
        self.check(True, f"EK certificate issued by '{ek.issuer.rfc4514_string()}'")

        self._start_server(stack)

        self.begin("sandbox boots the image, PCRs measured")
        image = self.workdir / "agent-desktop.img"
        image.write_bytes(_image_bytes())
        boot = tpm.measure_boot(image.read_bytes())
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        self.check(True, f"image sha256:{digest[:12]}..., PCRs {','.join(map(str, boot.pcrs))}, "
                         f"event log {len(boot.log)} bytes")

        self.begin("publisher signs the image (sandboxsec image sign)")
        manifest = self.workdir / "agent-desktop.dsse.json"
        pcr_args = [a for i in QUOTED_PCRS for a in ("--pcr", f"{i}={boot.pcrs[i].hex()}")]
        signed = self._cli("image", "sign", str(image), "--key", str(publisher / "signer.key"),
                           "--cert", str(publisher / "signer.pem"), *pcr_args,
                           "--version", "1.0.0", "--valid-days", "30", "-o", str(manifest))
        self.check(signed.returncode == 0,
                   f"DSSE manifest with {len(QUOTED_PCRS)} reference PCRs"
                   if signed.returncode == 0 else signed.stderr.strip())

        self.begin("anyone verifies the manifest offline (image verify)")
        verified = self._cli("image", "verify", str(image), str(manifest), "--trust-root",
                             str(trust / "trust-roots" / "publishers" / "demo-publisher.pem"))
        said = verified.stdout.strip()
        if verified.returncode == 0 and ", signed by " in said:
            said = "valid, signed by " + said.split(", signed by ", 1)[1].split(", expires")[0]
        self.check(verified.returncode == 0, said if verified.returncode == 0
                   else verified.stderr.strip())

        self._wait_for_server(stack)

        self.begin("operator creates a tenant (sandboxsec tenant create)")
        created = self._cli("tenant", "create", f"demo-bank-{secrets.token_hex(3)}")
        if created.returncode != 0:
            self.check(False, created.stderr.strip())
        tenant = json.loads(created.stdout)
        self.facts["tenant_id"] = tenant["tenant_id"]
        if self.options.keep:
            # Kept state is only useful with the keys to it; owner-only, like the service's.
            keys = self.workdir / "tenant.json"
            keys.touch(mode=0o600)
            keys.write_text(created.stdout)
        self.check(set(tenant["keys"]) == {"admin", "agent", "approver", "auditor"},
                   f"{_short(tenant['tenant_id'])} with keys for "
                   f"{', '.join(sorted(tenant['keys']))}")

        self.agent_key = tenant["keys"]["agent"]
        p = _Parties(
            agent=stack.enter_context(AgentClient(self.base, tenant["keys"]["agent"])),
            # Any key may verify a grant; the downstream here holds the agent's.
            downstream=stack.enter_context(DownstreamClient(self.base,
                                                            tenant["keys"]["agent"])),
            approver=stack.enter_context(ApproverClient(self.base, tenant["keys"]["approver"])),
            admin=stack.enter_context(AdminClient(self.base, tenant["keys"]["admin"])),
            auditor=stack.enter_context(AuditorClient(self.base, tenant["keys"]["auditor"])),
        )
        enrol_path = self._enrol_person(p)
        session_id = self._attest(p, tpm, manifest.read_bytes())
        self._name_owner(p, session_id)
        records = self._record(p, session_id)
        self._second_key(p, session_id)
        login_id, payment_id = self._ask(p, session_id)
        login, payment = self._decide(p, enrol_path, login_id, payment_id)
        self._grants(p, login, payment)
        self._read_back(p, session_id, records)
        self._audit(p, tenant["tenant_id"])

    # -- parts -------------------------------------------------------------------------------

    def _enrol_person(self, p: _Parties) -> str:
        self.begin("admin enrols Alice, the person the agent works for")
        person = p.admin.call("POST", "/v1/people", json=PERSON)
        self.facts["person_id"] = person["person_id"]
        self.check(person["enrolment"]["enrolment_path"].startswith("/enroll/"),
                   f"{_short(person['person_id'])} with a one-time enrolment link")
        return str(person["enrolment"]["enrolment_path"])

    def _name_owner(self, p: _Parties, session_id: str) -> None:
        self.begin("admin names Alice the session's owner")
        owner = p.admin.call("PUT", f"/v1/sessions/{session_id}/owner",
                             json={"person_id": self.facts["person_id"]})
        try:
            p.agent.call("PUT", f"/v1/sessions/{session_id}/owner",
                         json={"person_id": self.facts["person_id"]})
            by_agent = "accepted"
        except ApiError as exc:
            by_agent = exc.code
        self.facts["owner_by_agent"] = by_agent
        self.check(owner["owner_id"] == self.facts["person_id"] and by_agent == "forbidden",
                   f"approvals route to {_short(owner['owner_id'])}; the agent may not set it "
                   f"({by_agent})")

    def _attest(self, p: _Parties, tpm: SwTpm, manifest: bytes) -> str:
        self.begin("sandbox binds its AK to the certified EK")
        ak_name = p.agent.bind_ak(tpm)
        self.check(True, f"AK {ak_name[:16]}... activated the service's credential")

        self.begin("sandbox attests (challenge, quote, verify)")
        verdict = p.agent.attest(tpm, manifest)
        self.facts["attestation_status"] = verdict.status
        self.facts["attestation_failures"] = [code for code, _ in verdict.failures]
        detail = (f"{verdict.status}, trust vector "
                  f"{','.join(f'{k}={v}' for k, v in sorted(verdict.trust_vector.items()))}")
        if verdict.failures:
            detail += "; failures: " + ", ".join(code for code, _ in verdict.failures)
        self.check(verdict.affirming, detail)
        if verdict.unknown_event_types:
            self.note(f"event types replayed by digest: {', '.join(verdict.unknown_event_types)}")

        self.begin("session starts from the attestation token")
        assert verdict.token is not None
        session = p.agent.start_session(verdict.token)
        self.facts["session_id"] = session.session_id
        self.check(session.attested,
                   f"{_short(session.session_id)} on {session.image_name} "
                   f"({session.image_digest[:19]}...)")

        self.begin("the same token cannot start a second session")
        try:
            p.agent.start_session(verdict.token)
            replay = "accepted"
        except ApiError as exc:
            replay = exc.code
        self.facts["token_replay"] = replay
        self.check(replay != "accepted", f"refused: {replay}")
        return session.session_id

    def _second_key(self, p: _Parties, session_id: str) -> None:
        self.begin("a second agent key with the session id is refused")
        # Another agent key of the same tenant, on a machine that never attested, takes the
        # session id: without the session's TPM-held key its requests prove nothing.
        other = p.admin.create_api_key("agent", "second")
        refusals: list[str] = []
        with AgentClient(self.base, other.key) as thief:
            for signer in (None, _software_key()):
                if signer is not None:
                    thief.prover.attach(signer)
                try:
                    thief.ask(session_id, "login", LOGIN_RESOURCE, LOGIN)
                    refusals.append("accepted")
                except ApiError as exc:
                    refusals.append(exc.code)
        self.facts["second_key_refusals"] = refusals
        self.check("accepted" not in refusals, "refused: " + ", ".join(refusals)
                   + " (no proof; a proof by its own key)")

    def _record(self, p: _Parties, session_id: str) -> dict[str, tuple[str, bytes]]:
        self.begin("agent records its trajectory (encrypted)")
        screenshot = secrets.token_bytes(_SCREENSHOT_BYTES)
        steps: list[tuple[str, bytes, dict[str, Any]]] = [
            ("action", json.dumps({"tool": "browser.open",
                                   "url": "https://online.bank.example/login"}).encode(),
             {"step": 1}),
            ("observation", b"Online Banking - sign in. Fields: user, password.", {"step": 2}),
            ("screenshot", screenshot, {"step": 3, "format": "png", "width": 1280,
                                        "height": 800}),
            ("action", json.dumps({"tool": "payments.prepare", "payee": "acme-gmbh",
                                   "amount": "120.00", "currency": "EUR"}).encode(),
             {"step": 4}),
        ]
        ids: dict[str, tuple[str, bytes]] = {}
        for kind, data, meta in steps:
            ids[kind] = (p.agent.record(session_id, kind, data, meta).record_id, data)
        self.facts["records_written"] = len(steps)
        self.check(True, f"{len(steps)} records ({', '.join(k for k, _, _ in steps)}; "
                         f"screenshot {len(screenshot) // 1024} KiB)")
        return ids

    def _ask(self, p: _Parties, session_id: str) -> tuple[str, str]:
        self.begin("agent asks to log in to a new domain")
        login = p.agent.ask(session_id, "login", LOGIN_RESOURCE, LOGIN)
        self.facts["login_decision"] = login.decision
        self.check(login.decision == "approval_required" and login.approval_id is not None,
                   f"{login.decision} (rule {login.rule_id}), approval "
                   f"{_short(login.approval_id or '-')}, code {login.short_code}")

        self.begin("agent asks to pay 120.00 EUR to acme-gmbh")
        pay = p.agent.ask(session_id, "payment", PAYMENT_RESOURCE, PAYMENT)
        self.facts["payment_decision"] = pay.decision
        self.check(pay.decision == "approval_required" and pay.approval_id is not None,
                   f"{pay.decision} (rule {pay.rule_id}), approval "
                   f"{_short(pay.approval_id or '-')}, code {pay.short_code}")
        self.facts["short_codes"] = {"login": login.short_code, "payment": pay.short_code}
        assert login.approval_id is not None and pay.approval_id is not None
        return login.approval_id, pay.approval_id

    def _decide(self, p: _Parties, enrol_path: str, login_id: str,
                payment_id: str) -> tuple[Approval, Approval]:
        # The agent waits (long-poll) while the person decides, as a runtime would.  Daemon
        # threads: an interrupted run must not sit out their long-poll before cleaning up
        # (stopping the server ends the polls anyway).
        waits = {aid: _Waiter(self.base, self.agent_key, aid, self.options.wait_timeout_seconds,
                              p.agent)
                 for aid in (login_id, payment_id)}
        codes = self.facts["short_codes"]
        decisions = ((login_id, "approve", "the login", codes["login"]),
                     (payment_id, "deny", "the payment", codes["payment"]))
        if not (self._browser_available() and self._decide_in_browser(enrol_path, decisions)):
            self._decide_by_api(p, enrol_path, decisions)
        login, payment = waits[login_id].result(), waits[payment_id].result()

        self.begin("agent's waits return each outcome")
        self.facts["login_state"] = login.state
        self.facts["payment_state"] = payment.state
        self.facts["login_grant_issued"] = login.grant is not None
        self.check(login.state == "approved" and login.grant is not None
                   and payment.state == "denied",
                   f"login {login.state} with a grant; payment {payment.state}")
        return login, payment

    def _browser_available(self) -> bool:
        if not self.options.browser:
            self.note("--no-browser: Alice decides through the API, as the page does, with a "
                      "software passkey")
            return False
        if not Path(self.options.chromium_path).exists():
            self.note(f"no browser at {self.options.chromium_path}: Alice decides through the "
                      "API, as the page does, with a software passkey")
            return False
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            self.note("playwright is not installed: Alice decides through the API")
            return False
        return True

    def _decide_in_browser(self, enrol_path: str,
                           decisions: tuple[tuple[str, str, str, str], ...]) -> bool:
        """Enrol, sign in and decide in the pages; False (nothing done) if Chromium fails."""
        from playwright.sync_api import Error, expect, sync_playwright

        with sync_playwright() as pw:
            try:
                browser = pw.chromium.launch(executable_path=self.options.chromium_path,
                                             args=list(CHROMIUM_ARGS))
            except Error as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no reason"
                self.note(f"Chromium did not start ({first}): Alice decides through the API, "
                          "as the page does")
                return False
            self.browser_used = True
            try:
                page = browser.new_page()
                # Alice's device: a platform authenticator that verifies her (CDP WebAuthn).
                cdp = page.context.new_cdp_session(page)
                cdp.send("WebAuthn.enable", {"enableUI": False})
                cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
                    "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
                    "hasUserVerification": True, "isUserVerified": True,
                    "automaticPresenceSimulation": True}})
                self.begin("Alice registers a passkey on the enrolment page")
                page.goto(self.origin + enrol_path)
                expect(page.locator("#handle")).to_have_text(PERSON["handle"])
                page.click("#register")
                expect(page.locator("#result")).to_have_text("Passkey registered.")
                self.check(True, "in Chromium (virtual authenticator, user verification "
                                 "required)")
                self.begin("Alice signs in with it and sees her pending requests")
                page.goto(self.origin + "/approve")
                page.click("#signin")
                links = page.locator("#list a")
                expect(links).to_have_count(len(decisions))
                listed = [links.nth(i).get_attribute("data-approval-id")
                          for i in range(len(decisions))]
                self.check(listed == [decisions[1][0], decisions[0][0]],
                           "in Chromium: the payment, then the login (newest first)")
                for aid, verb, what, code in decisions:
                    self.begin(f"Alice {'approves' if verb == 'approve' else 'denies'} "
                               f"{what} in the approval page")
                    page.goto(f"{self.origin}/approve/{aid}")
                    expect(page.locator("#state")).to_have_text("pending")
                    shown = {k: page.text_content(f"#{k}") for k in
                             ("action", "amount", "currency", "payee", "domain",
                              "short-code", "params-hash")}
                    # The person compares the code with the agent's screen first.
                    if shown["short-code"] != code:
                        self.check(False, f"the page shows code {shown['short-code']}, "
                                          f"the agent {code}: not deciding")
                    page.click(f"#{verb}")
                    expect(page.locator("#result")).to_have_text(
                        "Approved." if verb == "approve" else "Denied.")
                    state = page.text_content("#state") or ""
                    self.facts[f"page_{verb}"] = shown
                    what_shown = ", ".join(f"{k} {v}" for k, v in shown.items()
                                           if v and v != "-" and k not in
                                           ("params-hash", "short-code"))
                    self.check(state == ("approved" if verb == "approve" else "denied"),
                               f"{state} with her passkey in Chromium; page showed "
                               f"{what_shown}, code {code} as on the agent's screen")
            finally:
                browser.close()
        return True

    def _decide_by_api(self, p: _Parties, enrol_path: str,
                       decisions: tuple[tuple[str, str, str, str], ...]) -> None:
        """What the pages do, through the API, with a software passkey for Alice's device."""
        from sandboxsec.sandbox.passkey import SoftPasskey

        device = SoftPasskey(rp_id="localhost", origin=self.origin)
        # The approval page's calls: no API key, the page's Origin, then her sign-in cookie.
        page = ApproverClient(self.base, None)
        token = enrol_path.rsplit("/", 1)[1]
        origin = {"Origin": self.origin}
        try:
            self.begin("Alice registers a passkey (API)")
            options = page.call("POST", f"/v1/enroll/{token}/options", headers=origin)
            cred = page.call("POST", f"/v1/enroll/{token}/register", headers=origin, json={
                "challenge_id": options["challenge_id"], "credential": device.create(options)})
            self.check(bool(cred["credential_id"]), "software passkey, user verified")

            self.begin("Alice signs in with it and sees her pending requests (API)")
            options = page.call("POST", "/v1/signin/options", headers=origin)
            signin = page.request("POST", "/v1/signin", headers=origin, json={
                "challenge_id": options["challenge_id"], "credential": device.get(options)})
            if not signin.ok:
                self.check(False, f"sign-in refused: {signin.status}")
            cookie = {"Cookie": _cookie(signin.headers.get("set-cookie", ""),
                                        "sandboxsec_person"), **origin}
            listed = [a["id"] for a in page.call("GET", "/v1/me/approvals", headers=cookie)]
            self.check(listed == [decisions[1][0], decisions[0][0]],
                       "the payment, then the login (newest first)")
            for aid, verb, what, code in decisions:
                self.begin(f"Alice {'approves' if verb == 'approve' else 'denies'} {what} "
                           "(API)")
                request = page.call("GET", f"/v1/me/approvals/{aid}", headers=cookie)
                if request["short_code"] != code:
                    self.check(False, f"the request shows code {request['short_code']}, the "
                                      f"agent {code}: not deciding")
                # Like the page: recompute the hash of the params shown, check the challenge
                # commits to it, and sign.
                shown_hash = params_hash(request["params"])
                challenge = page.call("POST", f"/v1/me/approvals/{aid}/challenge",
                                      headers=cookie, json={"decision": verb})
                if challenge["params_hash"] != shown_hash:
                    self.check(False, "the challenge does not commit to the params shown")
                out = page.call("POST", f"/v1/me/approvals/{aid}/{verb}", headers=cookie,
                                json={"challenge_id": challenge["challenge_id"],
                                      "params_hash": shown_hash,
                                      "credential": device.get(challenge)})
                self.check(out["state"] == ("approved" if verb == "approve" else "denied"),
                           f"{out['state']} with her passkey; code {code} as on the agent's "
                           "screen, params hash recomputed")
        finally:
            page.close()

    def _grants(self, p: _Parties, login: Approval, payment: Approval) -> None:
        self.begin("no grant exists for the denied payment")
        seen = p.agent.approval(payment.id)
        self.facts["payment_grant"] = seen.grant
        self.check(seen.state == "denied" and seen.grant is None,
                   f"state {seen.state}, grant {'present' if seen.grant else 'none'}")

        self.begin("the denied payment cannot be approved afterwards")
        try:
            p.approver.approve(payment.id, payment.params_hash)
            late = "approved"
        except ApiError as exc:
            late = exc.code
        self.facts["late_approve"] = late
        self.check(late == "approval_not_pending", f"refused: {late}")

        assert login.grant is not None
        self.begin("downstream checks the login grant with other params")
        other = dict(LOGIN, domain="evil.example")
        tampered = p.downstream.verify_grant(login.grant, "login", other)
        self.facts["grant_other_params"] = tampered.code
        self.check(not tampered.valid and tampered.code == "grant_params_mismatch",
                   f"refused: {tampered.code} (the grant is not used up)")

        self.begin("downstream verifies the login grant")
        first = p.downstream.verify_grant(login.grant, "login", LOGIN, LOGIN_RESOURCE)
        self.facts["grant_first_use"] = first.valid
        self.check(first.valid, f"valid, grant {_short(first.grant_id or '-')} now used")

        self.begin("the same grant replayed")
        replay = p.downstream.verify_grant(login.grant, "login", LOGIN, LOGIN_RESOURCE)
        self.facts["grant_replay"] = replay.code
        self.check(not replay.valid and replay.code == "grant_already_used",
                   f"refused: {replay.code}")
        self.facts["login_state_after_use"] = p.agent.approval(login.id).state

    def _read_back(self, p: _Parties, session_id: str,
                   records: dict[str, tuple[str, bytes]]) -> None:
        self.begin("admin reads the screenshot back (decrypted)")
        record_id, data = records["screenshot"]
        got = p.admin.read_record(session_id, record_id)
        back = got.data
        same = back == data and got.raw["content_sha256"] == hashlib.sha256(data).hexdigest()
        self.facts["trajectory_read_back"] = same
        self.check(same, f"{_short(record_id)}: {len(back) // 1024} KiB, SHA-256 "
                         f"{'matches' if same else 'DIFFERS'}")

    def _audit(self, p: _Parties, tenant_id: str) -> None:
        self.begin("auditor exports the tenant's audit log")
        pub = self.workdir / "audit.pub"
        pub.write_text(p.auditor.key().public_key_pem)
        export = self.workdir / "audit-export.jsonl"
        data = p.auditor.export()
        export.write_bytes(data)
        for line in data.splitlines():
            if line.startswith(b'{"v":'):
                e = json.loads(line)
                status = e["body"].get("status")
                self.events.append(AuditLine(e["seq"], e["event"], e["outcome"], e["reason"],
                                             status if isinstance(status, str) else None))
        self.check(bool(self.events), f"{len(self.events)} entries, {len(data)} bytes")

        self.begin("sandboxsec audit verify (offline, public key only)")
        verified = self._cli("audit", "verify", str(export), "--public-key", str(pub),
                             "--log", tenant_id)
        self.facts["audit_verify_exit"] = verified.returncode
        try:
            summary = json.loads(verified.stdout)
        except ValueError:
            summary = {}
        self.facts["audit_verify"] = summary
        self.check(verified.returncode == 0 and summary.get("valid") is True
                   and summary.get("decisions_verified") == 2,
                   f"valid: {summary.get('entries')} entries, tree size "
                   f"{summary.get('tree_size')}, {summary.get('decisions_verified')} passkey "
                   "decisions re-verified" if verified.returncode == 0
                   else (verified.stderr.strip() or verified.stdout.strip()))

        self.begin("the export shows every event of the scenario")
        missing = [f"{ev}{'=' + oc if oc else ''}" for ev, oc in EXPECTED_EVENTS
                   if not any(e.event == ev and oc in (None, e.outcome, e.status)
                              for e in self.events)]
        self.facts["missing_events"] = missing
        self.out("")
        self.out("    seq  event                        outcome              reason")
        for e in self.events:
            self.out(f"    {e.seq:>3}  {e.event:<28} {e.shown_outcome:<20} {e.reason or ''}"
                     .rstrip())
        self.out("")
        self.check(not missing, "all present" if not missing else "missing " + ", ".join(missing))

    # -- processes ---------------------------------------------------------------------------

    def _workdir(self, stack: contextlib.ExitStack) -> None:
        if self.options.workdir is not None:
            self.workdir = self.options.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
            if any(self.workdir.iterdir()):
                # A fresh service means fresh state: never mix with an earlier run's files.
                self.check(False, f"{self.workdir} is not empty")
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="sandboxsec-demo-"))
        if self.options.keep:
            self.kept = self.workdir
        elif self.options.workdir is None:
            stack.callback(shutil.rmtree, self.workdir, True)
        (self.workdir / "home").mkdir(mode=0o700, exist_ok=True)
        # A fresh service: nothing of the caller's SANDBOXSEC_* settings leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
        env["SANDBOXSEC_HOME"] = str(self.workdir / "home")
        env["SANDBOXSEC_LOG_LEVEL"] = "warning"
        if self.options.postgres_url:
            env["SANDBOXSEC_DATABASE_URL"] = self.options.postgres_url
        self.env = env

    def _mkdir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir()
        return path

    def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real command line, as a user runs it (same interpreter, same environment)."""
        return subprocess.run(  # noqa: S603 - our own argv, no shell
            [sys.executable, "-m", "sandboxsec.cli", *args], env=self.env,
            capture_output=True, text=True, timeout=120, check=False,
        )

    def _start_server(self, stack: contextlib.ExitStack) -> None:
        self.begin("service starts (sandboxsec serve)")
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        # People's pages (and their passkeys) live on the configured public origin.
        self.origin = f"http://localhost:{port}"
        self.env["SANDBOXSEC_PUBLIC_ORIGIN"] = self.origin
        log = (self.workdir / "server.log").open("ab")
        stack.callback(log.close)
        proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            # A fresh deployment: the database is created (or, on PostgreSQL, its schema)
            # by the server on purpose (--migrate), as an operator would on a first node.
            [sys.executable, "-m", "sandboxsec.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--migrate"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        stack.callback(_stop, proc)
        self.facts["server_pid"] = proc.pid
        self.server = proc
        self.server_started = time.monotonic()

    def _wait_for_server(self, stack: contextlib.ExitStack) -> None:
        for attempt in range(3):
            proc = self.server
            assert proc is not None
            deadline = self.server_started + self.options.startup_timeout_seconds
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                        break
                time.sleep(0.1)
            else:
                # The free port can be taken between choosing it and the server binding it.
                if (proc.poll() is not None and attempt < 2
                        and "address already in use" in _tail(self.workdir).lower()):
                    self._start_server(stack)
                    continue
                self.current = "service starts (sandboxsec serve)"
                code = proc.poll()
                for line in _tail(self.workdir).splitlines():
                    self.note(f"server: {line}")
                self.check(False, f"the server exited with code {code}" if code is not None
                           else f"no answer on /healthz within "
                                f"{self.options.startup_timeout_seconds:g} s")
            break
        assert self.server is not None
        db = "PostgreSQL" if self.options.postgres_url else "SQLite"
        self.current = "service starts (sandboxsec serve)"
        self.check(True, f"{self.base} ({db}, pid {self.server.pid})")


def _cookie(set_cookie: str, name: str) -> str:
    """``name=value`` of the cookie ``name`` in a ``Set-Cookie`` header (empty if absent)."""
    jar: SimpleCookie = SimpleCookie()
    jar.load(set_cookie)
    morsel = jar.get(name)
    return f"{name}={morsel.value}" if morsel is not None else ""


def _software_key() -> SoftwareP256Signer:
    """A key the second machine made in software (on purpose: it is the thief's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureSignerWarning)
        return SoftwareP256Signer()


class _Waiter:
    """An agent worker long-polling one approval in a daemon thread (own client, own key)."""

    def __init__(self, base: str, key: str, approval_id: str, timeout: float,
                 bound: AgentClient) -> None:
        self._outcome: Approval | BaseException | None = None
        self._timeout = timeout
        self._bound = bound  # its session key signs this worker's proofs too
        self._thread = threading.Thread(target=self._run, args=(base, key, approval_id),
                                        name=f"agent-wait-{approval_id[:12]}", daemon=True)
        self._thread.start()

    def _run(self, base: str, key: str, approval_id: str) -> None:
        try:
            with AgentClient(base, key) as agent:
                agent.use_session(self._bound)
                self._outcome = agent.wait(approval_id, timeout=self._timeout)
        except BaseException as exc:  # handed to the main thread by result()
            self._outcome = exc

    def result(self) -> Approval:
        self._thread.join(self._timeout + 60)
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is None:
            raise RuntimeError("the agent's wait did not return")
        return outcome


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server we started: SIGTERM to its own process group, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _tail(workdir: Path, lines: int = 20) -> str:
    try:
        text = (workdir / "server.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _image_bytes() -> bytes:
    # Stands in for a VM disk image: deterministic, so its digest is stable between runs.
    block = hashlib.sha256(b"sandboxsec demo image").digest()
    return (block * (_IMAGE_BYTES // len(block)))[:_IMAGE_BYTES]


# -- the publisher's PKI ---------------------------------------------------------------------


def _make_publisher(directory: Path, trust: Path) -> str:
    """A publisher root CA and a code-signing leaf (ECDSA P-256); the root goes to trust."""
    directory.mkdir(parents=True)
    now = SystemClock().now()
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Demo Publisher Root CA")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name).issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()),
                       critical=False)
        .sign(root_key, hashes.SHA256())
    )
    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    "Demo Image Publisher")]))
        .issuer_name(root_name)
        .public_key(signer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    key_path = directory / "signer.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(signer_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (directory / "signer.pem").write_bytes(signer.public_bytes(serialization.Encoding.PEM))
    # The root CA's key is not needed after this: a real publisher keeps it offline.
    publishers = trust / "trust-roots" / "publishers"
    publishers.mkdir(parents=True, exist_ok=True)
    (publishers / "demo-publisher.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return "root 'Demo Publisher Root CA' trusted by the service, signer ECDSA P-256"


def _install_tpm_roots(tpm: SwTpm, trust: Path) -> None:
    """The swtpm local CA plays the TPM manufacturer: its root and issuer become trusted."""
    for sub, name, cert in (("tpm-manufacturers", "swtpm-localca-root.pem", tpm.ca_root),
                            ("tpm-intermediates", "swtpm-localca-issuer.pem", tpm.ca_issuer)):
        directory = trust / "trust-roots" / sub
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))

