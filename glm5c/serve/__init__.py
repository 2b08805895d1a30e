"""The server: `glm5c serve` runs a supervisor (supervisor.py) over three kinds of process —
tokenizer (tokenizer_proc.py), worker (worker_proc.py) and detokenizer (detokenizer_proc.py) —
that talk over ZMQ with msgspec messages (messages.py). Clients speak `glm5c.protocol`."""

from .supervisor import ServeConfig, ServeError, serve

__all__ = ["ServeConfig", "ServeError", "serve"]
