"""The OpenAI-compatible HTTP API of the CoE (FastAPI), served beside the Gradio playground."""

from coe_core.api.server import build_server, serve

__all__ = ["build_server", "serve"]
