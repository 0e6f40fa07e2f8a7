"""Chat templates rendered by rung equal transformers' rendering of the same template, and untrusted
templates cannot reach Python internals."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from rung.text import ChatTemplate, ChatTemplateError, HarmonyTemplate, Tokenizer, chat_template_for
from rung.text.templates import CHATML_TEMPLATE, GEMMA3_TEMPLATE, QWEN3_TEMPLATE
from test_text_gguf_metadata import smollm2_tokenizer, smollm2_transformers
from test_text_tokenizer import byte_level_metadata, sentencepiece_metadata

GPT_OSS_TEMPLATE = (Path(__file__).parent / "fixtures" / "gpt_oss_chat_template.jinja").read_text()

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer"}},
        "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now, in UTC."}}

CHATS = {
    "user": [{"role": "user", "content": "Hello! Ça va? 日本 😀"}],
    "system_user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi_turn": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "  2+2?  "},
                   {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?\n"}],
    "assistant_last": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
}

QWEN3_CHATS = {
    **CHATS,
    "thinking_history": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "Thanks!"}],
    "reasoning_content": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"humidity": "40%"}'},
        {"role": "assistant", "content": "It is 21 °C.", "reasoning": "Tool said 21."}],
    "tool_call_string_arguments": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"function": {"name": "get_time", "arguments": "{}"}},
                        {"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "12:00"}],
    "openai_nulls": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "reasoning_content": None,
         "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "12:00"}],
}


@lru_cache(maxsize=None)
def transformers_tokenizer(bos_token: str | None, eos_token: str | None):
    """A transformers tokenizer whose only job is apply_chat_template with these special tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE
    from transformers import TokenizersBackend

    return TokenizersBackend(tokenizer_object=Backend(BPE()), bos_token=bos_token, eos_token=eos_token)


def transformers_render(template: str, messages, bos_token=None, eos_token=None, **kwargs) -> str:
    return transformers_tokenizer(bos_token, eos_token).apply_chat_template(
        messages, chat_template=template, tokenize=False, **kwargs)


def test_smollm2_gguf_template_matches_transformers_apply_chat_template():
    theirs = smollm2_transformers()
    ours = smollm2_tokenizer()
    template = chat_template_for(ours)
    assert isinstance(template, ChatTemplate) and template.source == ours.chat_template
    for name, chat in CHATS.items():
        for gen in (True, False):
            expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert template.render(chat, add_generation_prompt=gen) == expected, (name, gen)
    ids = ours.encode_chat(CHATS["system_user"])
    assert ids == theirs.apply_chat_template(CHATS["system_user"], tokenize=True, add_generation_prompt=True,
                                        return_dict=False)


@pytest.mark.parametrize("name", list(CHATS) + ["content_parts"])
def test_gemma3_template_matches_transformers(name):
    chat = CHATS.get(name) or [{"role": "system", "content": [{"type": "text", "text": "Short answers."}]},
                               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What? "}]}]
    template = ChatTemplate(GEMMA3_TEMPLATE, bos_token="<bos>", eos_token="<eos>")
    for gen in (True, False):
        expected = transformers_render(GEMMA3_TEMPLATE, chat, add_generation_prompt=gen, bos_token="<bos>",
                                       eos_token="<eos>")
        assert template.render(chat, add_generation_prompt=gen) == expected


def test_gemma3_template_raises_like_transformers_on_roles_out_of_order():
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        transformers_render(GEMMA3_TEMPLATE, chat, bos_token="<bos>")
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        ChatTemplate(GEMMA3_TEMPLATE, bos_token="<bos>").render(chat)


def test_gemma3_template_renders_the_known_prompt():
    rendered = ChatTemplate(GEMMA3_TEMPLATE, bos_token="<bos>").render(CHATS["system_user"])
    assert rendered == "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("name", list(QWEN3_CHATS))
@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_template_matches_transformers(name, thinking):
    chat = QWEN3_CHATS[name]
    tools = [WEATHER_TOOL, TIME_TOOL] if "tool" in name or "reasoning" in name else None
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    template = ChatTemplate(QWEN3_TEMPLATE, eos_token="<|im_end|>")
    for gen in (True, False):
        expected = transformers_render(QWEN3_TEMPLATE, chat, tools=tools, add_generation_prompt=gen,
                                       eos_token="<|im_end|>", **kwargs)
        assert template.render(chat, add_generation_prompt=gen, tools=tools, **kwargs) == expected


def test_qwen3_template_known_strings():
    """Outputs of Qwen3's template as its users document them: an empty think block when thinking is
    off, and one around the reply after the last user turn."""
    template = ChatTemplate(QWEN3_TEMPLATE)
    hello = [{"role": "user", "content": "Hello"}]
    assert template.render(hello) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert template.render(hello, enable_thinking=False) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    replied = hello + [{"role": "assistant", "content": "Hi there!"}]
    assert template.render(replied, add_generation_prompt=False) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHi there!<|im_end|>\n")
    called = template.render(QWEN3_CHATS["reasoning_content"][:3], tools=[WEATHER_TOOL])
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    assert f"<tool_call>\n{call}\n</tool_call>" in called
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>" in called
    assert '"description": "Current weather in a city."' in called  # tools as JSON, not HTML-escaped


def test_gpt_oss_template_matches_transformers():
    """gpt-oss's own (HF) template exercises macros, namespaces, loop slicing, tojson and strftime_now."""
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "thinking": "Use the tool.", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "21 C"}]
    for kwargs in ({}, {"reasoning_effort": "high", "builtin_tools": ["browser", "python"]}):
        for gen in (True, False):
            expected = transformers_render(GPT_OSS_TEMPLATE, chat, tools=[WEATHER_TOOL, TIME_TOOL],
                                           add_generation_prompt=gen, **kwargs)
            assert ChatTemplate(GPT_OSS_TEMPLATE).render(chat, add_generation_prompt=gen,
                                                         tools=[WEATHER_TOOL, TIME_TOOL], **kwargs) == expected


def test_generation_tag_renders_its_body_like_transformers():
    source = ("{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
              "{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    chat = CHATS["multi_turn"]
    assert ChatTemplate(source).render(chat) == transformers_render(source, chat, add_generation_prompt=True)


def test_tojson_keeps_unicode_and_html_characters():
    template = ChatTemplate("{{ x | tojson }}|{{ x | tojson(indent=2) }}")
    out = template.render([], x={"k": "<a & 'b'> é 日本"})
    assert out == '{"k": "<a & \'b\'> é 日本"}|{\n  "k": "<a & \'b\'> é 日本"\n}'


def test_template_helpers():
    template = ChatTemplate("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
                            "{% endfor %}|{{ strftime_now('%Y') | length }}|{% set ns = namespace(n=1) %}"
                            "{% set ns.n = ns.n + 1 %}{{ ns.n }}|{{ dict(a=1)['a'] }}")
    assert template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a|4|2|1"


MALICIOUS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{% set ns = namespace(_secret=1) %}{{ ns }}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'content': 'x'}) }}",
    "{{ ''.format.__globals__ }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{{ strftime_now.__code__ }}",
]


@pytest.mark.parametrize("source", MALICIOUS)
def test_malicious_templates_raise_instead_of_executing(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_broken_templates_are_clear_errors():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="custom failure"):
        ChatTemplate("{{ raise_exception('custom failure') }}").render([])
    with pytest.raises(ChatTemplateError, match="list of dicts"):
        ChatTemplate(CHATML_TEMPLATE).render("hello")


def test_inputs_are_not_modified():
    chat = [{"role": "assistant", "content": "x", "reasoning": "r"}]
    ChatTemplate(QWEN3_TEMPLATE).render(chat)
    assert chat == [{"role": "assistant", "content": "x", "reasoning": "r"}]


def test_chat_template_for_falls_back_by_model_type():
    assert chat_template_for("gemma3").source == GEMMA3_TEMPLATE
    assert chat_template_for("qwen3").source == QWEN3_TEMPLATE
    assert chat_template_for("gpt2").source == CHATML_TEMPLATE
    assert chat_template_for(None).render([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert isinstance(chat_template_for("gpt_oss"), HarmonyTemplate)


def test_chat_template_for_prefers_the_model_template_and_passes_its_tokens():
    tokenizer = Tokenizer.from_gguf_metadata({**byte_level_metadata(),
                                              "tokenizer.chat_template": "{{ bos_token }}{{ eos_token }}"})
    assert chat_template_for(tokenizer).render([]) == "<|endoftext|><|im_end|>"
    without = Tokenizer.from_gguf_metadata({**byte_level_metadata(), "tokenizer.chat_template": None})
    assert chat_template_for(without).source == QWEN3_TEMPLATE  # general.architecture qwen3


def test_gemma3_gguf_without_template_gets_gemma3_fallback():
    """The Gemma 3 GGUF ships no tokenizer.chat_template; its architecture picks rung's Gemma 3
    template, which writes <bos> itself, so encode_chat adds no second one."""
    from test_text_gguf_metadata import gemma3_metadata

    assert "tokenizer.chat_template" not in gemma3_metadata()
    gemma_like = Tokenizer.from_gguf_metadata(sentencepiece_metadata("gemma3"))
    assert chat_template_for(gemma_like).source == GEMMA3_TEMPLATE
    ids = gemma_like.encode_chat([{"role": "user", "content": "the"}])
    assert gemma_like.decode(ids) == "<bos><start_of_turn>user\nthe<end_of_turn>\n<start_of_turn>model\n"
    assert ids[0] == gemma_like.bos_token_id and ids.count(gemma_like.bos_token_id) == 1
