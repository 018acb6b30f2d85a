"""A tiny random-weight BERT in HuggingFace format, with the real 30522-token vocabulary.

Tests and the `--smoke` run use it in place of MiniLM: same file layout and tokenizer, a
fraction of the compute.
"""

from pathlib import Path

import torch

from stages.encoder import BertConfig, BertEncoder, default_model_dir, save_bert


def write_tiny_bert(out_dir, hidden=32, layers=2, heads=2, intermediate=64, seed=0, tokenizer_from=None) -> Path:
    """Writes config.json, model.safetensors and tokenizer files; the same seed gives the same bytes."""
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        encoder = BertEncoder(config)
    return save_bert(encoder, out_dir, tokenizer_from=tokenizer_from or default_model_dir())
