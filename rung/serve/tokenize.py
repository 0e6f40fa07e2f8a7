"""POST /tokenize and POST /detokenize, in vLLM's shape.

/tokenize takes ``model`` (optional, as in vLLM, where one model is served) and either ``prompt``
(a string, tokenized as /v1/completions does, special tokens written in it parsed, BOS added unless
``add_special_tokens`` is false) or
``messages`` (rendered by the model's chat template exactly as /v1/chat/completions renders them,
with ``tools``, ``chat_template_kwargs`` and ``add_generation_prompt``; the template writes BOS
itself, so ``add_special_tokens`` defaults to false there). It returns ``{"count", "max_model_len",
"tokens"}`` (and ``token_strs`` when ``return_token_strs`` is true): ``count`` is what the chat or
completions route would report as ``usage.prompt_tokens``.

/detokenize takes ``model`` (as /tokenize does) and ``tokens`` (ids within the vocabulary) and returns ``{"prompt"}``.
Both are bounded by --max-request-bytes and MAX_TOKENS, and refuse bad input with OpenAI's error
shape, naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from rung.serve.errors import bad_request
from rung.serve.schemas import ChatCompletionRequest, Message, Strict, Tool

MAX_TOKENS = 1_000_000  # ids in one /detokenize request (the body's size bounds it anyway)


class TokenizeRequest(Strict):
    model: str | None = None  # optional, as in vLLM: the served model when there is one
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_TOKENS)


def tokenize(server, req: TokenizeRequest, principal=None) -> dict:
    """The body of /tokenize's reply (blocking: run it off the event loop)."""
    tokenizer = server.llm.tokenizer
    if req.messages is not None:
        chat = ChatCompletionRequest.model_validate(
            {"model": server.config.name, "messages": req.messages, "tools": req.tools,
             "chat_template_kwargs": req.chat_template_kwargs, "add_generation_prompt": req.add_generation_prompt,
             "max_tokens": 1})
        ids = list(server.prepare_chat(chat, principal).prompt_ids)  # the very ids a chat request would run
        bos = tokenizer.bos_token_id
        if req.add_special_tokens and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
    else:
        if req.tools is not None or req.chat_template_kwargs is not None:
            raise bad_request("tools and chat_template_kwargs go with messages, not prompt",
                              "tools" if req.tools is not None else "chat_template_kwargs")
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tokenizer.encode(req.prompt, add_special_tokens=add)
    reply = {"count": len(ids), "max_model_len": server.llm.max_model_len, "tokens": ids}
    if req.return_token_strs:
        reply["token_strs"] = [tokenizer.id_to_token(t) for t in ids]
    return reply


def detokenize(server, req: DetokenizeRequest) -> dict:
    """The body of /detokenize's reply (blocking: run it off the event loop)."""
    vocab = server.llm.config.vocab_size
    for i, t in enumerate(req.tokens):
        if not 0 <= t < vocab:
            raise bad_request(f"token id {t} is outside the vocabulary [0, {vocab})", f"tokens.{i}")
    return {"prompt": server.llm.tokenizer.decode(req.tokens)}
