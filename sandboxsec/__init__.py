"""sandboxsec: attested sandboxes, human approval for sensitive actions, encrypted trajectories
and a verifiable audit log for AI-agent sandboxes."""

__version__ = "0.1.0"
