from __future__ import annotations

import io
import json

from sandboxsec.logging import REDACTED, configure_logging, get_logger, redact_text


def _capture() -> io.StringIO:
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    return buf


def test_sensitive_fields_redacted_whatever_their_type() -> None:
    buf = _capture()
    get_logger("t").info(
        "event",
        api_key="ssk_0123456789abcdef_" + "x" * 43,
        pin=1234,
        nested={"password": ["a", "b"], "amount": 5},
        key_id="k1",
    )
    line = json.loads(buf.getvalue())
    assert line["api_key"] == REDACTED
    assert line["pin"] == REDACTED  # integers too: Vault's audit leaves them in clear
    assert line["nested"]["password"] == REDACTED
    assert line["nested"]["amount"] == 5
    assert line["key_id"] == "k1"


def test_secret_patterns_in_free_text_are_redacted() -> None:
    key = "ssk_0123456789abcdef_" + "Q" * 43
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln"
    text = f"Authorization: Bearer {key} token {jwt}"
    out = redact_text(text)
    assert key not in out and jwt not in out


def test_traceback_locals_never_logged() -> None:
    buf = _capture()
    planted = "ssk_fedcba9876543210_" + "S" * 43

    def fail() -> None:
        secret_local = planted  # noqa: F841 - must not leak through locals
        raise RuntimeError("boom")

    try:
        fail()
    except RuntimeError:
        get_logger("t").exception("failed")
    out = buf.getvalue()
    assert "boom" in out
    assert planted not in out
    assert "S" * 43 not in out
