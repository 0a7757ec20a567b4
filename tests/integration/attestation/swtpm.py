"""The swtpm driver moved into the product (``sandboxsec.sandbox.swtpm``); re-exported here."""

from sandboxsec.sandbox.swtpm import *  # noqa: F403
