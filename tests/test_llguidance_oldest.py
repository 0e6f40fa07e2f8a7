"""The oldest llguidance pyproject.toml allows still gives structured output.

llguidance before 1.7 takes one EOS id where later versions take a list, and rung's
``Grammars`` once passed the list unconditionally: on 1.6.1 (the newest wheel for glibc 2.28,
RHEL 8) every ``response_format`` and forced tool call was a 400. This test installs the declared
minimum (and 1.6.1) into a folder of its own with pip, never into the environment, and runs a
json_schema answer and a forced tool call through ``Grammars`` in a child process that imports
that llguidance first. It needs the package index; without it, it skips and says so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hostile import ROOT, run_bounded


def declared_minimum() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    spec = next(d for d in deps if d.startswith("llguidance"))
    found = re.fullmatch(r"llguidance\s*>=\s*([0-9.]+)", spec.split(";")[0].strip())
    assert found, f"pyproject.toml's serve extra should declare llguidance>=VERSION, not {spec!r}"
    return found.group(1)


def install(version: str, target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
           "--target", str(target), f"llguidance=={version}"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip could not fetch llguidance=={version} within 120 s (no package index?)")
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"pip could not install llguidance=={version} (no package index?): {last}")


CHECK = """
import importlib.metadata, json
import llguidance
assert llguidance.__file__.startswith({target!r}), llguidance.__file__
assert importlib.metadata.version("llguidance") == {version!r}, importlib.metadata.version("llguidance")

from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
from rung.serve.family import Family
from rung.serve.structured import Grammars, json_text
from rung.text.tokenizer import Tokenizer

backend = Backend(models.BPE())
backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
backend.decoder = decoders.ByteLevel()
corpus = ['{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}', '{{"kind": "cat", "ok": true}}']
backend.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
backend.add_special_tokens(["<|im_end|>", "<|endoftext|>"])
tokenizer = Tokenizer(backend, eos_token="<|im_end|>", eos_token_ids=[backend.token_to_id("<|endoftext|>")])
eos = sorted(tokenizer.eos_token_ids)
assert len(eos) == 2
grammars = Grammars(tokenizer, tokenizer.vocab_size)

def walk(grammar, text, wrong):
    # every token of `text` is allowed in turn, `wrong` is refused first, and then every EOS ends it
    constraint = grammars.compile(grammar)()
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert not constraint.allowed([])[tokenizer.encode(wrong, add_special_tokens=False)[0]]
    for i, t in enumerate(ids):
        mask = constraint.allowed(ids[:i])
        assert mask[t], (text, i)
        assert not mask[eos].any(), (text, i)
    assert constraint.allowed(ids)[eos].all()

schema = {{"type": "object", "properties": {{"kind": {{"enum": ["cat", "dog"]}}, "ok": {{"type": "boolean"}}}},
          "required": ["kind", "ok"], "additionalProperties": False}}
walk(Family("json", False).grammar_answer(schema, thinking=False), json_text({{"kind": "cat", "ok": True}}), "x")
weather = {{"type": "function", "function": {{"name": "get_weather", "parameters": {{
    "type": "object", "properties": {{"city": {{"type": "string"}}}}, "required": ["city"]}}}}}}
call = '<tool_call>\\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\\n</tool_call>'
walk(Family("hermes", False).grammar_call([weather], False, grammars.added), call, "Paris")
print("structured output works on llguidance", llguidance.__file__)
"""


@pytest.mark.parametrize("which", ["declared minimum", "1.6.1"])
def test_structured_output_works_on_the_oldest_declared_llguidance(tmp_path, which):
    version = declared_minimum() if which == "declared minimum" else which
    target = tmp_path / f"llguidance-{version}"
    install(version, target)
    res = run_bounded(CHECK.format(target=str(target), version=version), seconds=60, catch=False,
                      env={"PYTHONPATH": f"{target}{os.pathsep}{ROOT}"})
    assert "structured output works" in res.assert_ok()
