"""OpenAI-compatible HTTP server with the safety guard (needs the ``serve`` extra:
fastapi, uvicorn, pydantic-settings, httpx, prometheus_client). See ``docs/serve.md``.

Names are imported on first use, so ``safevlm.serve.settings`` (for the CLI flags) does not
pull in FastAPI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "safevlm.serve.engine",
    "Job": "safevlm.serve.engine",
    "Metrics": "safevlm.serve.metrics",
    "Upstream": "safevlm.serve.upstream",
    "ServerSettings": "safevlm.serve.settings",
    "add_settings_arguments": "safevlm.serve.settings",
    "create_app": "safevlm.serve.app",
    "run_server": "safevlm.serve.app",
    "serve_in_thread": "safevlm.serve.app",
    "settings_from_args": "safevlm.serve.settings",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'safevlm.serve' has no attribute {name!r}")


__all__ = [
    "Engine",
    "Job",
    "Metrics",
    "ServerSettings",
    "Upstream",
    "add_settings_arguments",
    "create_app",
    "run_server",
    "serve_in_thread",
    "settings_from_args",
]
