"""An OpenAI-compatible HTTP server on a model's long-lived engine: `python -m grok.serve`, or
`grok.serve.create_app(model)` for an ASGI app (FastAPI) to run under any server.

Needs the `serve` extra (fastapi, uvicorn, prometheus-client); nothing else in grok imports it.
"""
from __future__ import annotations

from grok.serve.app import create_app

__all__ = ["create_app"]
