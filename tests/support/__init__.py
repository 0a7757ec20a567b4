"""Helpers tests and benches share: a test PKI, a software TPM, a PostgreSQL cluster and the
fault harness.  Benches import from here, never from ``tests/unit`` or ``tests/integration``."""
