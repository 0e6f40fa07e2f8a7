"""rung serve: an OpenAI-compatible HTTP server over the engine (chat and text completions,
streaming, tool calls, reasoning, structured output, limits, auth, Prometheus metrics)."""

from rung.extras import require

require("serve", what="rung.serve")  # before any of its modules imports fastapi, pydantic, ...
