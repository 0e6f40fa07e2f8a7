import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the oracle helpers

import torch

# pytest-xdist runs one worker per core: torch's own threads on top would oversubscribe the
# machine and make small matmuls tens of times slower.
torch.set_num_threads(1)


import pytest  # noqa: E402


# ---- tiny models with a real tokenizer, shared by the engine tests -------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from oracle import tiny_chat_model
    from rung.text import load_tokenizer
    from rung.weights.loader import load_model

    folder = tiny_chat_model(tmp_path_factory.mktemp("llama"), max_position_embeddings=256)
    return load_model(folder), load_tokenizer(folder)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """Sliding window of 5 on even layers, sinks, MoE: the window's blocks are recycled as it moves."""
    import transformers as tf

    from oracle import tiny_chat_model
    from rung.text import load_tokenizer
    from rung.weights.loader import load_model

    folder = tiny_chat_model(tmp_path_factory.mktemp("gpt-oss"), tf.GptOssConfig, head_dim=12, num_local_experts=4,
                             num_experts_per_tok=2, intermediate_size=32, sliding_window=5, num_hidden_layers=2,
                             max_position_embeddings=256)
    return load_model(folder), load_tokenizer(folder)
