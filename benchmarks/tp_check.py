"""The GPU path of a tensor-parallel model on one GPU: two ranks share the card through gloo
(``RUNG_TP_BACKEND=gloo``), so the Triton kernels run on each rank's shard (its head counts, its
expert widths) with the collectives between them. Correctness only: the speed of tensor
parallelism needs one GPU per rank and NCCL (benchmarks/gpu_tp.py).

Tiny random models of tests/test_tensor_parallel.py's families, float32 on CUDA: greedy tokens
and logits of TP=2 against one process on the same GPU.

    PYTHONPATH=.:tests python3 benchmarks/tp_check.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("RUNG_TP_BACKEND", "gloo")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from oracle import tiny_chat_model  # noqa: E402
from test_tensor_parallel import FAMILIES, GREEDY, PROMPTS  # noqa: E402

from rung.llm import LLM  # noqa: E402


def check(name: str, spec: str, device: str) -> tuple[str, float, bool]:
    one = LLM(spec, device=device)
    expected = [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY)]
    ids = torch.tensor([PROMPTS[0]], device=device)
    with torch.inference_mode():
        reference = one.model(ids).cpu()
    del one
    with LLM(spec, device=device, tensor_parallel_size=2) as two:
        got = [o.outputs[0].token_ids for o in two.generate(PROMPTS, GREEDY)]
        with torch.inference_mode():
            logits = two.tp_group.forward(two.model, ids).cpu()
    return name, (logits - reference).abs().max().item(), got == expected


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config_class, config) in FAMILIES.items():
            folder = Path(tmp, name)
            folder.mkdir()
            tiny_chat_model(folder, config_class, **config)
            try:
                rows.append(check(name, str(folder), device))
            except Exception as e:  # noqa: BLE001 - report every family
                rows.append((name, float("nan"), f"{type(e).__name__}: {e}"[:120]))
            print(rows[-1], flush=True)
    print(f"\nTP=2 on one {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'} (gloo), float32, against one process")
    print("| family | max |Δlogit| | greedy tokens equal |")
    print("|---|---|---|")
    for name, diff, same in rows:
        print(f"| {name} | {diff:.2e} | {same} |")


if __name__ == "__main__":
    main()
