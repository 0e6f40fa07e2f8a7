"""rung: one readable decoder for the GPT-2 → gpt-oss lineage, a fast engine, and a bench that picks the smallest model that passes."""

from rung.config import ConfigError, ModelConfig, MoEConfig, RopeConfig, preset_names

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelConfig", "MoEConfig", "RopeConfig", "preset_names", "describe", "load_model", "LLM",
           "SamplingParams", "redact"]


def __getattr__(name):
    # Heavy modules (torch) load on first use, so `rung arch` starts fast.
    if name == "describe":
        # the module rung/describe.py, callable as its function: importing it binds this attribute
        # to the module anyway, so the first call and every later one get the same object
        import importlib

        return importlib.import_module("rung.describe")
    if name == "load_model":
        from rung.weights.loader import load_model

        return load_model
    if name == "LLM":
        from rung.llm import LLM

        return LLM
    if name == "SamplingParams":
        from rung.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "redact":
        from rung.govern.redact import redact

        return redact
    if name in ("CheckpointError",):
        from rung.weights import safetensors_io

        return getattr(safetensors_io, name)
    raise AttributeError(f"module 'rung' has no attribute {name!r}")
