"""Text in and out of a model: tokenizers (HF folders and GGUF metadata), streaming detokenization,
chat templates, and gpt-oss's harmony format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rung.text.chat import ChatTemplate, ChatTemplateError, chat_template_for, encode_chat
from rung.text.detok import IncrementalDetokenizer
from rung.text.harmony import (HarmonyEvent, HarmonyMessage, HarmonyStreamParser, HarmonyTemplate, parse_harmony,
                               render_harmony, to_chat_message)
from rung.text.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "HarmonyEvent", "HarmonyMessage", "HarmonyStreamParser",
           "HarmonyTemplate", "IncrementalDetokenizer", "Tokenizer", "chat_template_for", "encode_chat",
           "load_tokenizer", "parse_harmony", "render_harmony", "to_chat_message"]


def load_tokenizer(path_or_gguf_metadata: str | Path | dict[str, Any]) -> Tokenizer:
    """A Tokenizer from a Hugging Face folder (tokenizer.json + its configs) or from a GGUF file's
    metadata dict (GGUF keys → plain Python values, as stored)."""
    if isinstance(path_or_gguf_metadata, dict):
        return Tokenizer.from_gguf_metadata(path_or_gguf_metadata)
    path = Path(path_or_gguf_metadata)
    if path.is_dir():
        return Tokenizer.from_hf_folder(path)
    if path.suffix == ".gguf":
        raise ValueError(f"{path}: pass the GGUF file's metadata dict (GGUF keys → Python values), not its path")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder")
    raise ValueError(f"{path}: expected a Hugging Face folder holding tokenizer.json")
