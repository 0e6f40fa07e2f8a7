"""A CPU process that loads and runs a model imports neither Triton nor torch._dynamo: together
they are ~100 MB resident, a third of an int4 SmolLM2's peak memory."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
from rung.llm import LLM
from rung.engine.sampling_params import SamplingParams
for spec in (sys.argv[1], sys.argv[1] + "@int4"):
    LLM(spec).generate("Hello there", SamplingParams(max_tokens=3, temperature=0))
print(",".join(m for m in ("triton", "torch._dynamo") if m in sys.modules) or "none")
"""


def test_loading_and_decoding_on_the_cpu_imports_no_triton_or_dynamo(tmp_path):
    from oracle import tiny_chat_model  # transformers writes the folder here, in the test's process

    folder = tiny_chat_model(tmp_path, hidden_size=64, intermediate_size=64)
    proc = subprocess.run([sys.executable, "-c", CHECK, str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "none"
