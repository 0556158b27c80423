"""Serving: the continuous-batching engine (engine.py, cache.py), the OpenAI-compatible API (api.py,
its request bodies in schemas.py), constrained decoding and tool calls (grammar.py, tools.py), the
chat page (static/), and `ouvert serve` (cli.py). Nothing is imported here, so `ouvert generate`
never loads FastAPI."""
