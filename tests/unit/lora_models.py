"""A tiny LoRA classifier for training tests: non-identity init (B != 0: a zero B hides update bugs), no dropout."""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.common.config import LoraSettings, ModelConfig
from fedtune.common.model import build_model


def lora_model(tiny_model_dir: Path, num_labels: int) -> torch.nn.Module:
    model = build_model(ModelConfig(base_model=str(tiny_model_dir)), LoraSettings(rank=4), num_labels, seed=1).model
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model
