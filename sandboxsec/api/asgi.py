"""The ASGI entry point for ``uvicorn`` workers: settings from the environment."""

from __future__ import annotations

from sandboxsec.api.app import create_app
from sandboxsec.logging import configure_logging
from sandboxsec.services import Services

_services = Services()
configure_logging(_services.settings.log_level, _services.settings.log_format)
app = create_app(_services, own_services=True)
