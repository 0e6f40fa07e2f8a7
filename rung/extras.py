"""rung's optional parts and the packages each one imports (pyproject's extras).

The core install (torch, safetensors, gguf, tokenizers, jinja2, numpy, rich) loads models, generates,
quantizes and runs `rung generate / chat / arch / fit / quantize`. The server, the bench, retrieval
and PII redaction each need more; their code imports those packages only when it runs, after
``require`` has checked them, so a missing one is one line that says what to install:

    rung serve: needs the serve extra (fastapi is not installed): pip install 'rung[serve]'

``require`` asks importlib where a module would come from (``find_spec``) without importing it: a
few milliseconds, and nothing of the extra is loaded before it is used.
"""

from __future__ import annotations

import importlib.util

# extra → the top-level modules its code imports (import names; pyproject lists the distributions)
EXTRAS: dict[str, tuple[str, ...]] = {
    # rung serve (rung.serve): HTTP, request schemas, metrics, grammar-constrained decoding, response_format
    # schemas, --policy files in YAML
    "serve": ("fastapi", "uvicorn", "pydantic", "prometheus_client", "llguidance", "jsonschema", "yaml"),
    # rung bench, rung suite (rung.bench): suites and requirements in YAML, endpoint candidates, json checks
    "bench": ("yaml", "openai", "jsonschema"),
    # rung index, --rag (rung.rag): BM25 and its Snowball stemmer
    "rag": ("bm25s", "Stemmer"),
    # --redact, rung.redact (rung.govern): Presidio over spaCy (the pipeline package is checked when it loads)
    "pii": ("presidio_analyzer", "spacy"),
    # rung serve --otlp-traces-endpoint (rung/serve/tracing.py): the OpenTelemetry SDK and its OTLP/HTTP exporter
    "otel": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
}


class MissingExtra(ImportError):
    """An optional part of rung was used without its extra installed; the message names the extra and the
    pip command (one line)."""


def message(what: str, extra: str, module: str) -> str:
    return f"{what}: needs the {extra} extra ({module} is not installed): pip install 'rung[{extra}]'"


def installed(module: str) -> bool:
    """Whether ``import module`` would find it, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses the name; a module without a spec
        return False


def require(extra: str, *modules: str, what: str = "rung") -> None:
    """Raise MissingExtra unless ``modules`` (default: all of the extra's) are installed; ``what`` is
    the command or module that needs them (``rung serve``, ``rung.bench``)."""
    for module in modules or EXTRAS[extra]:
        if not installed(module):
            raise MissingExtra(message(what, extra, module), name=module)
