"""Session proofs (pure): RFC 9449 / RFC 7638 known answers, an independent verifier
(joserfc), the leading-zero case of raw r || s, and every refusal with its reason code."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey

from sandboxsec.sessions import dpop
from sandboxsec.sessions.errors import (
    DpopAthMismatchError,
    DpopBodyMismatchError,
    DpopKeyMismatchError,
    DpopMalformedError,
    DpopMethodMismatchError,
    DpopSessionMismatchError,
    DpopSignatureInvalidError,
    DpopStaleError,
    DpopUrlMismatchError,
)
from tests.support.sessionkeys import SoftSessionKey

# RFC 9449 figure 2 (section 4.1): the token request proof, and its key's thumbprint
# (section 6.1, figure 9 / the cnf.jkt example).
RFC9449_FIG2 = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0Vj"
    "NoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5"
    "VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVC"
    "IsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP"
    "4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
)
RFC9449_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
# RFC 9449 figure 13 (section 7.1): the protected-resource proof with ath; its access token.
RFC9449_FIG13 = (
    RFC9449_FIG2.split(".")[0] + "."
    "eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxl"
    "Lm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0Ji"
    "MHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVn"
    "mcw6Fy1dqd-jfxSYoMxhAJpLjA"
)
RFC9449_ACCESS_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
# RFC 7638 section 3.1: the RSA example key and its thumbprint.
RFC7638_RSA = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc"
         "_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
         "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI"
         "4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
URL = "https://sandboxsec.example/v1/actions"
BODY = b'{"session_id":"ses_1","action":"payment"}'


def test_rfc7638_and_rfc9449_thumbprints() -> None:
    assert dpop.jwk_thumbprint(RFC7638_RSA) == RFC7638_THUMBPRINT
    header = json.loads(base64.urlsafe_b64decode(RFC9449_FIG2.split(".")[0] + "=="))
    assert dpop.jwk_thumbprint(header["jwk"]) == RFC9449_JKT
    assert dpop.ath_of(RFC9449_ACCESS_TOKEN) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


@pytest.mark.parametrize("proof", [RFC9449_FIG2, RFC9449_FIG13])
def test_rfc9449_figures_verify(proof: str) -> None:
    _, claims = dpop.verify_signature(proof, RFC9449_JKT)
    assert claims["jti"] in ("-BwC3ESc6acc2lTc", "e1j3V_bKic8-LAEB")
    with pytest.raises(DpopKeyMismatchError):
        dpop.verify_signature(proof, "A" * 43)
    tampered = proof[:-4] + ("AAAA" if not proof.endswith("AAAA") else "BBBB")
    with pytest.raises(DpopSignatureInvalidError):
        dpop.verify_signature(tampered, RFC9449_JKT)


def _proof(key: SoftSessionKey, **over: object) -> str:
    kw: dict[str, object] = {"method": "POST", "url": URL, "session_id": "ses_1", "body": BODY,
                             "now": NOW, "api_key": "ssk_agent"}
    kw |= over
    return dpop.create_proof(key.sign, key.jwk, **kw)  # type: ignore[arg-type]


def _verify(proof: str, key: SoftSessionKey, **over: object) -> dpop.VerifiedProof:
    kw: dict[str, object] = {"method": "POST", "url": URL, "body": BODY, "session_id": "ses_1",
                             "jkt": key.jkt, "now": NOW, "max_age_seconds": 60,
                             "skew_seconds": 5, "api_key": "ssk_agent"}
    kw |= over
    return dpop.verify_proof(proof, **kw)  # type: ignore[arg-type]


def test_round_trip_and_independent_verifier_with_leading_zero() -> None:
    """Loop until r or s has a leading zero byte: a DER-to-DER pair would hide a padding bug,
    so joserfc (an independent JWS implementation) verifies what we produce."""
    key = SoftSessionKey()
    for _ in range(2000):
        proof = _proof(key)
        sig = base64.urlsafe_b64decode(proof.split(".")[2] + "==")
        if sig[0] == 0 or sig[32] == 0:
            break
    else:  # each try has a leading zero with probability about 1/128
        pytest.fail("no signature with a leading zero in 2000 tries")
    assert len(sig) == 64
    out = jws.deserialize_compact(proof, ECKey.import_key(key.jwk), algorithms=["ES256"])
    assert json.loads(out.payload)["sid"] == "ses_1"
    assert out.headers()["typ"] == "dpop+jwt"
    verified = _verify(proof, key)
    assert (verified.session_id, verified.htm, verified.jkt) == ("ses_1", "POST", key.jkt)


def test_each_mismatch_has_its_reason() -> None:
    key = SoftSessionKey()
    proof = _proof(key)
    cases: list[tuple[dict[str, object], type[Exception]]] = [
        ({"jkt": SoftSessionKey().jkt}, DpopKeyMismatchError),
        ({"session_id": "ses_2"}, DpopSessionMismatchError),
        ({"method": "PUT"}, DpopMethodMismatchError),
        ({"url": "https://sandboxsec.example/v1/actions/x"}, DpopUrlMismatchError),
        ({"url": "https://other.example/v1/actions"}, DpopUrlMismatchError),
        ({"body": BODY + b" "}, DpopBodyMismatchError),
        ({"api_key": "ssk_other"}, DpopAthMismatchError),
        ({"now": NOW + timedelta(seconds=61)}, DpopStaleError),
        ({"now": NOW - timedelta(seconds=6)}, DpopStaleError),
    ]
    for over, error in cases:
        with pytest.raises(error):
            _verify(proof, key, **over)
    # Inside the window and with the URL spelled differently but equivalently: accepted.
    _verify(proof, key, now=NOW + timedelta(seconds=60),
            url="HTTPS://SANDBOXSEC.example:443/v1/actions?timeout=3#x")


def test_url_normalisation() -> None:
    assert dpop.normalize_url("HTTP://Host:80/a?b#c") == "http://host/a"
    assert dpop.normalize_url("https://h:8443") == "https://h:8443/"
    assert dpop.normalize_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1"
    for bad in ("ftp://h/x", "http:///x", "http://user@h/x", "http://h:99999/x", "/v1/x"):
        with pytest.raises(DpopMalformedError):
            dpop.normalize_url(bad)


def _seg(value: object) -> str:
    return dpop.b64url(json.dumps(value).encode())


@pytest.mark.parametrize("mutate", [
    lambda h, c, s: "not a jws",
    lambda h, c, s: "x" * 5000,
    lambda h, c, s: f"{h}.{c}.{s}.extra",
    lambda h, c, s: f"{h}=.{c}.{s}",                                # padding
    lambda h, c, s: f"{h}.{c}+.{s}",                                # standard alphabet
    lambda h, c, s: f"{h}.{c}.{s}".replace(h, "é"),                 # unicode
    lambda h, c, s: f"{_seg([1])}.{c}.{s}",                         # header not an object
    lambda h, c, s: f"{_seg({'typ': 'JWT', 'alg': 'ES256'})}.{c}.{s}",
    lambda h, c, s: f"{_seg({'typ': 'dpop+jwt', 'alg': 'none'})}.{c}.",
    lambda h, c, s: f"{_seg({'typ': 'dpop+jwt', 'alg': 'HS256'})}.{c}.{s}",
    lambda h, c, s: f"{_seg({'typ': 'dpop+jwt', 'alg': 'ES256', 'crit': ['x']})}.{c}.{s}",
    lambda h, c, s: f"{h}.{_seg({'htm': 'POST'})}.{s}",            # claims missing
    lambda h, c, s: f"{h}.{_seg({'jti': 'a', 'htm': 'POST', 'htu': URL, 'iat': True})}.{s}",
    lambda h, c, s: f"{h}.{dpop.b64url(b'[' * 5000)}.{s}",         # deep JSON
])
def test_malformed_proofs(mutate: object) -> None:
    key = SoftSessionKey()
    h, c, s = _proof(key).split(".")
    with pytest.raises((DpopMalformedError, DpopSignatureInvalidError)):
        _verify(mutate(h, c, s), key)  # type: ignore[operator]


def test_private_jwk_and_wrong_curve_refused() -> None:
    key = SoftSessionKey()
    h, c, s = _proof(key).split(".")
    header = json.loads(base64.urlsafe_b64decode(h + "=="))
    for jwk in ({**header["jwk"], "d": "AAAA"}, {**header["jwk"], "crv": "P-384"},
                {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}):
        forged = f"{_seg({**header, 'jwk': jwk})}.{c}.{s}"
        with pytest.raises(DpopMalformedError):
            _verify(forged, key)


def test_signature_must_be_64_raw_bytes() -> None:
    key = SoftSessionKey()
    h, c, _ = _proof(key).split(".")
    # A DER signature (what pyca and tpm2-pytss give) is not a JWS ES256 signature.
    der = key.private.sign(f"{h}.{c}".encode(), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(DpopSignatureInvalidError):
        _verify(f"{h}.{c}.{dpop.b64url(der)}", key)


def test_header_cache_keeps_every_check_but_the_header_parse() -> None:
    # A header that verified once is remembered by its exact text; a later proof with the
    # same header still has its key, signature, claims and freshness checked.
    cache = dpop.KeyCache()
    key, other = SoftSessionKey(), SoftSessionKey()
    first = _proof(key)
    assert dpop.verify_signature(first, key.jkt, cache)[1]["htu"] == URL
    assert cache.lookup(first.split(".")[0]) is not None
    second = _proof(key)
    head, claims, sig = second.split(".")
    with pytest.raises(DpopKeyMismatchError):  # cached header, another session's key
        dpop.verify_signature(second, other.jkt, cache)
    flipped = sig[:-2] + ("AA" if not sig.endswith("AA") else "BA")
    with pytest.raises(DpopSignatureInvalidError):
        dpop.verify_signature(f"{head}.{claims}.{flipped}", key.jkt, cache)
    # Claims signed by another key under the cached header: the cached key refuses them.
    forged = _proof(other).split(".")
    with pytest.raises(DpopSignatureInvalidError):
        dpop.verify_signature(f"{head}.{forged[1]}.{forged[2]}", key.jkt, cache)
    with pytest.raises(DpopStaleError):
        dpop.verify_proof(_proof(key, now=NOW - timedelta(minutes=5)), method="POST", url=URL,
                          body=BODY, session_id="ses_1", jkt=key.jkt, now=NOW,
                          max_age_seconds=60, skew_seconds=5, api_key="ssk_agent", keys=cache)


def test_header_cache_keeps_only_headers_whose_proof_verified() -> None:
    cache = dpop.KeyCache()
    key = SoftSessionKey()
    head, claims, sig = _proof(key).split(".")
    flipped = sig[:-2] + ("AA" if not sig.endswith("AA") else "BA")
    with pytest.raises(DpopSignatureInvalidError):
        dpop.verify_signature(f"{head}.{claims}.{flipped}", key.jkt, cache)
    assert cache.lookup(head) is None


def test_htu_equal_to_the_url_skips_no_check() -> None:
    key = SoftSessionKey()
    with pytest.raises(DpopUrlMismatchError):
        dpop.verify_proof(_proof(key, url=URL + "x"), method="POST", url=URL, body=BODY,
                          session_id="ses_1", jkt=key.jkt, now=NOW, max_age_seconds=60,
                          skew_seconds=5, api_key="ssk_agent")
    # Another spelling of the same URL is still the same URL.
    upper = "HTTPS://SANDBOXSEC.example:443/v1/actions"
    assert dpop.verify_proof(_proof(key, url=upper), method="POST", url=URL, body=BODY,
                             session_id="ses_1", jkt=key.jkt, now=NOW, max_age_seconds=60,
                             skew_seconds=5, api_key="ssk_agent").htu == URL
