"""OpenAI-compatible inference server: one base model + N LoRA adapters, plus upstream routes.

`create_app(engine, ...)` (app.py) builds the FastAPI app; `Engine` (engine.py) owns the model
and batches concurrent requests; `serve_command` (cli.py) is `llama-train serve`. The names are
imported on first use, so the engine works where the HTTP stack (fastapi) is not installed.
"""

__all__ = ["Engine", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from llama_train.serve.app import create_app

        return create_app
    if name == "Engine":
        from llama_train.serve.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
