"""HTTP API and web UI: `create_app(ServerConfig(...))`, served by `latentforge serve`."""

from .app import create_app
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
