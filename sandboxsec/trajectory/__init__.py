"""Encrypted trajectories: records and streams of one agent session, sealed per tenant."""
