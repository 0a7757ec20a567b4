"""Policy decisions on agent actions, human approval, and single-use grants.

``engine`` (casbin, per tenant), ``approvals`` (state machine), ``grants`` (signed tokens) and
``canonical`` (params_hash) are pure; ``service`` is the adapter the API uses.  See
``docs/policy.md``.
"""
