"""The ASGI entry point for ``uvicorn`` workers: settings from the environment."""

from __future__ import annotations

import sys

from sandboxsec.api.app import create_app
from sandboxsec.logging import configure_logging
from sandboxsec.services import Services

# Request threads hand the GIL to each other every 5 ms by default; a thread that holds the
# database writer lock and waits for the GIL after each statement then stalls every other
# writer.  A shorter interval keeps lock holds (and so tail latency) short.
sys.setswitchinterval(0.0005)

_services = Services()
configure_logging(_services.settings.log_level, _services.settings.log_format)
app = create_app(_services, own_services=True)
