"""The classification task: text -> tensors, and the metrics both sides report.

One seam for the task (columns, head, loss, metrics), so a generative task can sit beside it:
:func:`task_loss` gives each task's loss to the shared DP-SGD loop (``client/train.py``); the
causal-LM task lives in ``common/causal_lm.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .errors import ConfigError, DataError

TASKS = ("classification", "causal-lm")

# loss(model, batch, reduction) for a batch of the task's TensorDataset. With "mean" it must be the
# mean over the batch of per-example losses (Opacus scales each per-example gradient by the batch
# size) and with "sum" their sum; no example's loss may depend on another example of the batch.
LossFn = Callable[[torch.nn.Module, Sequence[torch.Tensor], str], torch.Tensor]


def encode(
    tokenizer, texts: Sequence[str], labels: Sequence[str], label_names: Sequence[str], *, max_length: int
) -> TensorDataset:
    """Tokenize to fixed-length tensors (input ids, attention mask, label index).

    Padding goes to the longest example (at most ``max_length``); each batch is trimmed again to
    its own longest example in :func:`forward_loss`.
    """
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not in the run's label set {list(label_names)}")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    y = torch.tensor([index[lab] for lab in labels], dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], y)


def forward_loss(model: torch.nn.Module, batch: Sequence[torch.Tensor], reduction: str = "mean"):  # type: ignore[no-untyped-def]
    input_ids, attention_mask, labels = batch
    # Drop the padding columns no example in this batch uses: with right padding and an
    # attention mask the logits are unchanged, and short texts cost half the compute.
    if attention_mask.numel():
        width = max(1, int(attention_mask.sum(dim=1).max()))
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)
    return loss, logits


def classification_loss(model: torch.nn.Module, batch: Sequence[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    return forward_loss(model, batch, reduction=reduction)[0]


def task_loss(task: str) -> LossFn:
    """The per-example loss DP-SGD clips for ``task`` (one of ``TASKS``)."""
    if task == "classification":
        return classification_loss
    if task == "causal-lm":
        from .causal_lm import lm_loss

        return lm_loss
    raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}.")


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    macro_f1: float
    examples: int


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-label F1 over labels present in truth or prediction."""
    scores = []
    for k in range(num_labels):
        tp = int(np.sum((y_pred == k) & (y_true == k)))
        fp = int(np.sum((y_pred == k) & (y_true != k)))
        fn = int(np.sum((y_pred != k) & (y_true == k)))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TensorDataset, num_labels: int, *, batch_size: int = 64) -> EvalResult:
    if len(dataset) == 0:
        raise DataError("cannot evaluate on an empty split")
    was_training = model.training
    model.eval()
    total_loss, preds, truth = 0.0, [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        loss, logits = forward_loss(model, batch, reduction="sum")
        total_loss += float(loss)
        preds.append(logits.argmax(dim=-1).numpy())
        truth.append(batch[2].numpy())
    model.train(was_training)
    y_pred, y_true = np.concatenate(preds), np.concatenate(truth)
    return EvalResult(
        loss=total_loss / len(y_true),
        accuracy=float(np.mean(y_pred == y_true)),
        macro_f1=macro_f1(y_true, y_pred, num_labels),
        examples=len(y_true),
    )


@dataclass(frozen=True)
class ExampleScores:
    """Each example's cross-entropy loss (float64, shape (n,)) and class probabilities (shape (n, K)), in dataset order."""

    losses: np.ndarray
    probabilities: np.ndarray


@torch.no_grad()
def score_examples(model: torch.nn.Module, dataset: TensorDataset, *, batch_size: int = 64) -> ExampleScores:
    """One eval-mode pass over a classification ``dataset``: what a membership audit (the losses) and a
    site's expert review (both) read; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    losses, probs = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size):
            loss, logits = forward_loss(model, batch, reduction="none")
            losses.append(loss.double().numpy())
            probs.append(torch.softmax(logits, dim=-1).numpy())
    finally:
        model.train(was_training)
    if not losses:
        return ExampleScores(losses=np.empty(0), probabilities=np.empty((0, 0), dtype=np.float32))
    return ExampleScores(losses=np.concatenate(losses), probabilities=np.concatenate(probs))


def predict_proba(model: torch.nn.Module, dataset: TensorDataset, *, batch_size: int = 64) -> np.ndarray:
    """Each example's class probabilities (shape (n, K)), in dataset order: :func:`score_examples`' pass,
    so `fedtune predict`, serving and the review score a text alike."""
    return score_examples(model, dataset, batch_size=batch_size).probabilities
