"""A tiny BERT built from a config in code, saved as a local Hugging Face model folder.

For tests and quick experiments: it exercises the same "any local model directory" path as a
real model, reusing the packaged MiniLM tokenizer so no hub download is ever needed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def make_tiny_bert(folder: Path, *, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a randomly initialised tiny BERT (about 1M parameters) and a tokenizer to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel

    from .model import default_base_model_dir

    source = default_base_model_dir()
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(str(folder))
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder
