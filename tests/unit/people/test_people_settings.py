"""The relying party id and public origin are checked when the settings are read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sandboxsec.settings import Settings


@pytest.mark.parametrize(("rp_id", "origin"), [
    ("127.0.0.1", "http://localhost:8000"),          # an IP address is not an RP id
    ("Bank.Example", "https://bank.example"),         # lower case only
    ("bank.example", "https://evil.example"),         # the origin is outside the RP id
    ("bank.example", "https://approve.bank.example/approve"),  # an origin has no path
    ("bank.example", "http://approve.bank.example"),  # http only for localhost
    ("localhost", "http://127.0.0.1:8000"),           # pages on an IP cannot use passkeys
])
def test_bad_relying_party_settings_are_refused(rp_id: str, origin: str) -> None:
    with pytest.raises(ValidationError):
        Settings(webauthn_rp_id=rp_id, public_origin=origin)


def test_good_settings() -> None:
    s = Settings(webauthn_rp_id="bank.example", public_origin="https://approve.bank.example")
    assert s.webauthn_origins() == ("https://approve.bank.example",)
    assert Settings().webauthn_origins() == ("http://localhost:8000",)
