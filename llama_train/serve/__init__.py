"""OpenAI-compatible inference server: one base model + N LoRA adapters, plus upstream routes.

`create_app(engine, ...)` (app.py) builds the FastAPI app; `Engine` (engine.py) owns the model
and batches concurrent requests; `serve_command` (cli.py) is `llama-train serve`.
"""

from llama_train.serve.app import create_app
from llama_train.serve.engine import Engine

__all__ = ["Engine", "create_app"]
