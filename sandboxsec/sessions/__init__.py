"""Agent sessions, started only from an affirming attestation (see ``service.py``)."""
