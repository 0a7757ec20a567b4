"""Standard Webhooks signatures and the outbox backoff (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from standardwebhooks.webhooks import Webhook

from sandboxsec.webhooks.outbox import backoff
from sandboxsec.webhooks.signing import new_secret, signed_headers


def test_known_answer_from_the_specification() -> None:
    # The example of the Standard Webhooks specification (standard-webhooks/spec.md).
    h = signed_headers("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
                       datetime.fromtimestamp(1614265330, tz=UTC), '{"test": 2432232314}')
    assert h["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert h["webhook-id"] == "msg_p5jXN8AQM9LWM0D4loKWxJek"
    assert h["webhook-timestamp"] == "1614265330"


def test_a_receiver_verifies_and_a_changed_body_fails() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(secret) > 40
    now = datetime.now(UTC)
    body = '{"type":"approval.requested"}'
    headers = signed_headers(secret, "msg_1", now, body)
    assert Webhook(secret).verify(body, headers) == {"type": "approval.requested"}
    try:
        Webhook(secret).verify(body.replace("requested", "decided"), headers)
    except Exception as exc:
        assert "signature" in str(exc).lower()
    else:
        raise AssertionError("a changed body verified")
    try:
        Webhook(new_secret()).verify(body, headers)
    except Exception:
        pass
    else:
        raise AssertionError("another secret verified")


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n, 2.0, 60.0).total_seconds() for n in range(1, 7)] == [
        2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    assert backoff(40, 2.0, 60.0) == timedelta(seconds=60)
