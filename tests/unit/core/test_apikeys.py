from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxsec.errors import AuthenticationError
from sandboxsec.tenants.apikeys import generate_key, parse_key, secret_digest, secret_matches


def test_generated_key_has_256_bit_secret_and_parses_back() -> None:
    full, key_id, digest = generate_key()
    parsed = parse_key(full)
    assert parsed.key_id == key_id
    assert len(parsed.secret) == 43  # 32 random bytes, base64url
    assert secret_matches(parsed.secret, digest)
    assert digest == secret_digest(parsed.secret)
    assert parsed.secret not in digest


def test_keys_are_unique() -> None:
    assert len({generate_key()[0] for _ in range(200)}) == 200


def test_wrong_secret_does_not_match() -> None:
    full, _, digest = generate_key()
    secret = parse_key(full).secret
    flipped = ("A" if secret[0] != "A" else "B") + secret[1:]
    assert not secret_matches(flipped, digest)


@given(st.text(max_size=120))
def test_parse_refuses_anything_else_with_authentication_error(s: str) -> None:
    try:
        parse_key(s)
    except AuthenticationError:
        return
    # only well-formed keys parse
    assert s.strip().startswith("ssk_")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "ssk_",
        "Bearer x",
        "ssk_zzzzzzzzzzzzzzzz_" + "a" * 43,
        "ssk_0123456789abcdef_" + "a" * 42,
    ],
)
def test_malformed_keys_refused(bad: str) -> None:
    with pytest.raises(AuthenticationError):
        parse_key(bad)
