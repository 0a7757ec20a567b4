"""The reference sandbox-side attester: a software TPM (swtpm) driven with tpm2-pytss.

:func:`start_swtpm` manufactures a fresh vTPM in a directory (``swtpm_setup
--create-ek-cert`` with a CA made by ``swtpm_localca`` under that directory, which plays the
TPM manufacturer), starts ``swtpm socket`` on free loopback ports and connects.
:class:`SwTpm` measures a boot (extending the PCRs and writing the matching TCG event log),
creates AKs, quotes, runs ActivateCredential and reboots: everything a sandbox does in the
protocol of ``docs/attestation.md``.  ``sandboxsec demo`` and the test suite use it; a real
sandbox does the same with its own vTPM.

This is an edge adapter (processes, sockets, a TPM): the verifier never imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_SE, TPM2_ST, TPM2_SU, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPML_DIGEST,
    TPML_DIGEST_VALUES,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TPMU_HA,
)

from sandboxsec.attestation.eventlog import EventLogBuilder

__all__ = [
    "AK_ATTRS",
    "ECC_EK_CERT_NV",
    "ECC_EK_HANDLE",
    "ESYS_TR",
    "QUOTED_PCRS",
    "RSA_EK_CERT_NV",
    "RSA_EK_HANDLE",
    "SESSION_KEY_ATTRS",
    "Boot",
    "SwTpm",
    "available",
    "start_swtpm",
]

RSA_EK_HANDLE = 0x81010001
RSA_EK_CERT_NV = 0x01C00002
ECC_EK_HANDLE = 0x81010016
ECC_EK_CERT_NV = 0x01C00016
QUOTED_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 9)
AK_ATTRS = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
#: The session key: a non-duplicable key made inside the TPM that signs arbitrary digests.
SESSION_KEY_ATTRS = (
    TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
# PolicyOR branches of the TCG high-range (P-384) EK template: PolicyA and PolicyC, SHA-384.
_POLICY_A_SHA384 = bytes.fromhex(
    "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53"
)
_POLICY_C_SHA384 = bytes.fromhex(
    "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165"
)


_TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca", "swtpm_ioctl")


def available() -> bool:
    """Whether the swtpm tools this driver runs are installed."""
    return all(shutil.which(t) for t in _TOOLS)


def _tool(name: str) -> str:
    # Absolute paths, resolved once per call from PATH: the arguments are ours, never input.
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (Debian: apt-get install swtpm swtpm-tools)")
    return path


def _free_port_pair() -> int:
    # The swtpm TCTI talks to the control channel on port + 1.
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free port pair")


@dataclass
class Boot:
    """One measured boot: the event log written and the PCR values it produced."""

    log: bytes
    pcrs: dict[int, bytes]


@dataclass
class SwTpm:
    """A running vTPM: its process, an ESAPI connection and its manufacturer CA.

    ``close()`` stops the process; use it in a ``finally`` (or as a context manager).
    """

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    esapi: ESAPI
    ca_root: x509.Certificate
    ca_issuer: x509.Certificate
    image: bytes = b""
    boot: Boot | None = None
    aks: dict[str, tuple[ESYS_TR, bytes]] = field(default_factory=dict)
    session_key_handle: ESYS_TR | None = None
    session_key_public: bytes = b""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- identity ------------------------------------------------------------------------

    def ek_certificate(self, nv_index: int = RSA_EK_CERT_NV) -> bytes:
        handle = self.esapi.tr_from_tpmpublic(nv_index)
        pub, _ = self.esapi.nv_read_public(handle)
        size = int(pub.nvPublic.dataSize)
        data = b""
        while len(data) < size:
            chunk = self.esapi.nv_read(
                handle, min(512, size - len(data)), len(data), auth_handle=ESYS_TR.OWNER
            )
            data += bytes(chunk)
        # The NV area may be padded; the DER length prefix says where the certificate ends.
        cert = x509.load_der_x509_certificate(_der_prefix(data))
        return cert.public_bytes(serialization.Encoding.DER)

    def ek_public(self, handle: int = RSA_EK_HANDLE) -> bytes:
        pub, _, _ = self.esapi.read_public(self.esapi.tr_from_tpmpublic(handle))
        data: bytes = pub.marshal()
        return data

    def ak(self, label: str = "ak", *, scheme: str = "ecdsa-sha256",
           hierarchy: ESYS_TR = ESYS_TR.ENDORSEMENT) -> bytes:
        """Create (or return) an AK: a primary restricted ECC P-256 signing key."""
        if label not in self.aks:
            # A TPM holds only three transient objects: keep the main AK and one other.
            for other in [k for k in self.aks if k != "ak"]:
                self.esapi.flush_context(self.aks.pop(other)[0])
            tmpl = TPM2B_PUBLIC.parse(f"ecc256:{scheme}:null", objectAttributes=AK_ATTRS)
            handle, public, *_ = self.esapi.create_primary(None, tmpl, hierarchy)
            self.aks[label] = (handle, public.marshal())
        return self.aks[label][1]

    def ak_name(self, label: str = "ak") -> bytes:
        return b"\x00\x0b" + hashlib.sha256(self.aks[label][1][2:]).digest()

    # -- the session key -------------------------------------------------------------------

    def new_session_key(self, attributes: TPMA_OBJECT = SESSION_KEY_ATTRS) -> bytes:
        """Create a fresh session key (replacing the previous one); its TPM2B_PUBLIC.

        A primary key of the owner hierarchy whose template carries random ``unique`` bytes,
        so every session gets its own key; the private part never leaves the TPM.
        """
        self.drop_session_key()
        tmpl = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attributes)
        tmpl.publicArea.unique.ecc.x = secrets.token_bytes(32)
        handle, public, *_ = self.esapi.create_primary(None, tmpl, ESYS_TR.OWNER)
        self.session_key_handle = handle
        self.session_key_public = public.marshal()
        return self.session_key_public

    def certify_session_key(self, nonce: bytes, label: str = "ak") -> tuple[bytes, bytes]:
        """TPM2_Certify of the session key by the AK over ``nonce``: (TPMS_ATTEST,
        TPMT_SIGNATURE)."""
        if self.session_key_handle is None:
            raise RuntimeError("no session key: call new_session_key() first")
        attest, signature = self.esapi.certify(
            self.session_key_handle, self.aks[label][0], nonce,
            TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
        )
        return bytes(attest), signature.marshal()

    def sign_session(self, message: bytes) -> bytes:
        """TPM2_Sign of SHA-256(``message``) with the session key: raw ``r || s`` (64 bytes),
        each left-padded to 32 bytes as JWS ES256 wants (the TPM may return fewer)."""
        if self.session_key_handle is None:
            raise RuntimeError("no session key: call new_session_key() first")
        digest = hashlib.sha256(message).digest()
        with self._lock:  # an ESAPI context is not thread-safe; agent workers share the TPM
            return self._sign_digest(digest)

    def _sign_digest(self, digest: bytes) -> bytes:
        assert self.session_key_handle is not None
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        # A NULL ticket: the digest was computed outside the TPM, which is allowed for an
        # unrestricted key.
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        sig = self.esapi.sign(self.session_key_handle, digest, scheme, ticket)
        r = bytes(sig.signature.ecdsa.signatureR)
        s = bytes(sig.signature.ecdsa.signatureS)
        return r.rjust(32, b"\0") + s.rjust(32, b"\0")

    def drop_session_key(self) -> None:
        """Flush the session key from the TPM (it is gone for good: a fresh one is random)."""
        if self.session_key_handle is not None:
            with contextlib.suppress(Exception):  # best effort: already flushed by a reboot
                self.esapi.flush_context(self.session_key_handle)
        self.session_key_handle = None
        self.session_key_public = b""

    # -- measured boot ---------------------------------------------------------------------

    def measure_boot(self, image: bytes, firmware_events: int = 24) -> Boot:
        """Extend PCRs 0-7 like firmware and PCR 9 with the image, writing the event log."""
        builder = EventLogBuilder(("sha256",))
        pcrs = {i: bytes(32) for i in QUOTED_PCRS}
        kinds = [0x80000008, 0x80000001, 0x80000006, 0x80000003, 0x0000000D, 0x80000002]
        events: list[tuple[int, int, bytes]] = [
            (n % 8, kinds[n % len(kinds)], f"firmware component {n}".encode())
            for n in range(firmware_events)
        ]
        events += [(i, 0x00000004, b"\x00\x00\x00\x00") for i in range(8)]  # separators
        events.append((9, 0x0000000D, image))  # the image, as an IPL measurement
        events.append((9, 0x0000ABCD, b"vendor-specific event"))  # a type nobody knows
        for pcr, event_type, data in events:
            digest = builder.add(pcr, event_type, data)["sha256"]
            self.extend(pcr, digest)
            pcrs[pcr] = hashlib.sha256(pcrs[pcr] + digest).digest()
        self.image = image
        self.boot = Boot(log=builder.to_bytes(), pcrs=pcrs)
        return self.boot

    def expected_pcr9(self, image: bytes) -> bytes:
        """PCR 9 after a boot of ``image`` (the measurement :meth:`measure_boot` makes)."""
        value = bytes(32)
        for data in (image, b"vendor-specific event"):
            value = hashlib.sha256(value + hashlib.sha256(data).digest()).digest()
        return value

    def extend(self, pcr: int, digest: bytes) -> None:
        values = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]
        )
        self.esapi.pcr_extend(ESYS_TR.parse(f"pcr{pcr}"), values)

    def event_log(self) -> bytes | None:
        """The TCG event log of the last measured boot (``None`` before any)."""
        return self.boot.log if self.boot is not None else None

    def read_pcrs(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for chunk in (QUOTED_PCRS[:8], QUOTED_PCRS[8:]):
            _, _, values = self.esapi.pcr_read("sha256:" + ",".join(map(str, chunk)))
            out.update({i: bytes(v) for i, v in zip(chunk, values, strict=True)})
        return out

    def quote(self, nonce: bytes, label: str = "ak") -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE) over the quoted PCRs with ``nonce`` as extraData."""
        handle = self.aks[label][0]
        selection = "sha256:" + ",".join(map(str, QUOTED_PCRS))
        attest, signature = self.esapi.quote(
            handle, selection, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        )
        return bytes(attest), signature.marshal()

    def activate(self, credential_blob: bytes, encrypted_secret: bytes, *,
                 label: str = "ak", ek_handle: int = RSA_EK_HANDLE) -> bytes:
        """TPM2_ActivateCredential with the EK (authorised by its policy) and the AK."""
        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        high_range = ek_handle == ECC_EK_HANDLE
        session = self.esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA384 if high_range else TPM2_ALG.SHA256,
        )
        try:
            self.esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            if high_range:
                self.esapi.policy_or(session, TPML_DIGEST([_POLICY_A_SHA384, _POLICY_C_SHA384]))
            out = self.esapi.activate_credential(
                self.aks[label][0], self.esapi.tr_from_tpmpublic(ek_handle), blob, secret,
                session1=ESYS_TR.PASSWORD, session2=session,
            )
        finally:
            self.esapi.flush_context(session)
        return bytes(out)

    def reboot(self) -> None:
        """An orderly power cycle: Shutdown, the swtpm init (reset count + 1), Startup;
        then the same boot is measured again and the AKs are re-created (same keys)."""
        labels = list(self.aks)
        self.drop_session_key()
        for handle, _ in self.aks.values():
            self.esapi.flush_context(handle)
        self.aks.clear()
        self.esapi.shutdown(TPM2_SU.CLEAR)
        self.esapi.close()
        subprocess.run(  # noqa: S603 - fixed argv, no shell
            [_tool("swtpm_ioctl"), "--tcp", f"127.0.0.1:{self.port + 1}", "-i"],
            check=True, capture_output=True, timeout=10,
        )
        self.esapi = ESAPI(TCTILdr("swtpm", f"host=127.0.0.1,port={self.port}"))
        with contextlib.suppress(Exception):  # already started (swtpm startup-clear)
            self.esapi.startup(TPM2_SU.CLEAR)
        for label in labels:
            self.ak(label)
        self.measure_boot(self.image)

    def __enter__(self) -> SwTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush the AKs, disconnect and stop the swtpm process."""
        self.drop_session_key()
        for handle, _ in self.aks.values():
            with contextlib.suppress(Exception):  # best effort on teardown
                self.esapi.flush_context(handle)
        self.esapi.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def _der_prefix(data: bytes) -> bytes:
    if len(data) < 4 or data[0] != 0x30:
        return data
    if data[1] < 0x80:
        return data[: 2 + data[1]]
    n = data[1] & 0x7F
    length = int.from_bytes(data[2 : 2 + n], "big")
    return data[: 2 + n + length]


def start_swtpm(directory: Path, *, banks: tuple[str, ...] = ("sha256",)) -> SwTpm:
    """Manufacture a vTPM with EK certificates from a CA of its own, and start it.

    ``banks`` are the PCR banks it activates (:meth:`SwTpm.measure_boot` extends SHA-256).
    """
    if not banks or any(b not in ("sha1", "sha256", "sha384", "sha512") for b in banks):
        raise ValueError("banks must be among sha1, sha256, sha384, sha512")
    ca = directory / "ca"
    state = directory / "state"
    ca.mkdir()
    state.mkdir()
    (directory / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    (directory / "localca.options").write_text(
        "--platform-manufacturer sandboxsec-swtpm\n--platform-version 2.1\n"
        "--platform-model swtpm\n"
    )
    (directory / "setup.conf").write_text(
        f"create_certs_tool = {_tool('swtpm_localca')}\n"
        f"create_certs_tool_config = {directory}/localca.conf\n"
        f"create_certs_tool_options = {directory}/localca.options\n"
        f"active_pcr_banks = {','.join(banks)}\n"
    )
    subprocess.run(  # noqa: S603 - fixed argv, no shell
        [_tool("swtpm_setup"), "--tpm2", "--tpmstate", str(state), "--create-ek-cert", "--ecc",
         "--config", str(directory / "setup.conf"), "--overwrite"],
        check=True, capture_output=True, timeout=60,
    )
    for attempt in range(5):
        port = _free_port_pair()
        process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [_tool("swtpm"), "socket", "--tpm2",
             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
             "--tpmstate", f"dir={state}", "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        if process.poll() is None:
            break
        if attempt == 4:
            raise RuntimeError("swtpm did not start")
    try:
        esapi = ESAPI(TCTILdr("swtpm", f"host=127.0.0.1,port={port}"))
        root = x509.load_pem_x509_certificate((ca / "swtpm-localca-rootca-cert.pem").read_bytes())
        issuer = x509.load_pem_x509_certificate((ca / "issuercert.pem").read_bytes())
    except BaseException:
        # Never leave a vTPM process behind when the caller gets no handle to stop it.
        process.kill()
        process.wait(timeout=5)
        raise
    return SwTpm(directory=directory, port=port, process=process, esapi=esapi,
                 ca_root=root, ca_issuer=issuer)
