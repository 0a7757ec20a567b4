"""People who approve: enrolment, passkeys (WebAuthn), sign-in and passkey-signed decisions."""
