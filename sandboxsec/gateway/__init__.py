"""``sandboxsec gateway``: an MCP proxy that asks the policy before every tool call.

:mod:`.binding` (canonical arguments, tool hashes, the grant binding) and :mod:`.mapping`
(tool calls to actions) are pure; :mod:`.proxy` is the MCP server in front of one upstream.
"""
