"""The session key held by the sandbox's TPM, as a :class:`~.proofs.SessionKeySigner`.

Needs the ``tpm`` extra (``pip install 'sandboxsec-client[tpm]'``: tpm2-pytss and libtss2).

The process that attested the sandbox created the session key inside the TPM (a P-256
signing key that is fixedTPM, fixedParent and sensitiveDataOrigin: its private part never
leaves the chip) and had the AK certify it.  Another process of the same sandbox, such as
``sandboxsec gateway``, reaches that key in one of two ways:

- a **persistent handle** (``0x81xxxxxx``): the attesting process made the key persistent
  with ``TPM2_EvictControl``; :meth:`TpmSessionKey.open` with ``handle=``;
- a **saved context**: the attesting process saved the loaded key with
  ``TPM2_ContextSave`` (:meth:`TpmSessionKey.save_context` writes the bytes);
  :meth:`TpmSessionKey.open` with ``context=`` loads it again.  A saved context is only
  valid until the TPM is reset, which is what a session key wants.

Either way the TPM is named by a TCTI string as tpm2-tools spell it: ``device:/dev/tpmrm0``,
``tabrmd:``, ``swtpm:host=127.0.0.1,port=2321``.  Only a process that can talk to this TPM
can sign: that is the binding.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from sandboxsec_client.proofs import session_key_jwk

__all__ = ["TpmSessionKey"]


class TpmSessionKey:
    """A :class:`~.proofs.SessionKeySigner` whose key lives in a TPM: ``TPM2_Sign`` of
    SHA-256(message) with a NULL hash-check ticket (the key is unrestricted), answered as raw
    ``r || s``, each left-padded to 32 bytes."""

    def __init__(self, esapi: Any, key: Any, public: bytes, *, owns: bool) -> None:
        self._esapi = esapi
        self._key = key
        self.public = public
        self._jwk = session_key_jwk(public)
        self._owns = owns
        # An ESAPI context is not thread-safe; clients may sign from several threads.
        self._lock = threading.Lock()

    @classmethod
    def open(cls, tcti: str, *, handle: int | None = None,
             context: bytes | None = None) -> TpmSessionKey:
        """Connect to the TPM named by ``tcti`` and find the session key by its persistent
        ``handle`` or its saved ``context`` (exactly one)."""
        from tpm2_pytss import ESAPI
        from tpm2_pytss.types import TPMS_CONTEXT

        if (handle is None) == (context is None):
            raise ValueError("name the session key by exactly one of handle and context")
        if handle is not None and not 0x81000000 <= handle <= 0x81FFFFFF:
            raise ValueError("a persistent handle is 0x81000000..0x81FFFFFF")
        esapi = ESAPI(tcti)
        try:
            if handle is not None:
                key = esapi.tr_from_tpmpublic(handle)
            else:
                assert context is not None
                saved, used = TPMS_CONTEXT.unmarshal(context)
                if used != len(context):
                    raise ValueError("the saved context has trailing bytes")
                key = esapi.context_load(saved)
            public, _, _ = esapi.read_public(key)
            return cls(esapi, key, bytes(public.marshal()), owns=True)
        except BaseException:
            esapi.close()
            raise

    @classmethod
    def of(cls, esapi: Any, key: Any) -> TpmSessionKey:
        """The key ``key`` (an ``ESYS_TR``) on a connection the caller keeps and closes."""
        public, _, _ = esapi.read_public(key)
        return cls(esapi, key, bytes(public.marshal()), owns=False)

    def save_context(self) -> bytes:
        """``TPM2_ContextSave`` of the key, marshalled: what :meth:`open` takes as
        ``context`` in another process (the key stays loaded here too)."""
        with self._lock:
            return bytes(self._esapi.context_save(self._key).marshal())

    @property
    def jwk(self) -> Mapping[str, str]:
        """The public JWK of the key (read from the TPM)."""
        return dict(self._jwk)

    def sign(self, message: bytes) -> bytes:
        """ES256 over ``message`` by the TPM: raw ``r || s``."""
        from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPM2_ST
        from tpm2_pytss.types import TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK

        digest = hashlib.sha256(message).digest()
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        # A NULL ticket: the digest was computed outside the TPM, allowed for an
        # unrestricted key (a restricted one would refuse, and is not a session key).
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self._lock:
            sig = self._esapi.sign(self._key, digest, scheme, ticket)
        r = bytes(sig.signature.ecdsa.signatureR)
        s = bytes(sig.signature.ecdsa.signatureS)
        # The TPM drops leading zero bytes; JWS wants fixed 32-byte halves.
        return r.rjust(32, b"\0") + s.rjust(32, b"\0")

    def close(self) -> None:
        """Disconnect if :meth:`open` made the connection (the key stays in the TPM)."""
        if self._owns:
            self._esapi.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
