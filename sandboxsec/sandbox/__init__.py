"""The sandbox side of sandboxsec: a reference attester (swtpm) and an agent-runtime client.

These modules are what runs *inside* (or next to) an agent sandbox and talks to the service
over HTTP; the service never imports them.
"""
