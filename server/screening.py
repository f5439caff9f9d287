"""Screening of site replies before aggregation: a bad update is rejected with a logged reason.

Pure logic over Flower messages; the round goes on with the updates that pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message

from fedtune.common.errors import UpdateError, check_tensor_names

logger = logging.getLogger(__name__)

REQUIRED_TRAIN_METRICS = (
    "num-examples", "train-loss", "epsilon", "budget-epsilon", "delta",
    "noise-multiplier", "clip-norm", "sample-rate", "steps",
)


@dataclass(frozen=True)
class Rejection:
    site: str
    reason: str


def site_name(msg: Message) -> str:
    if not msg.has_error() and "site" in msg.content.config_records:
        return str(msg.content.config_records["site"].get("name", f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


def check_train_reply(msg: Message, expected: ArrayRecord) -> None:
    """Raise UpdateError unless the reply carries a well-formed update for ``expected``."""
    content = msg.content
    if "arrays" not in content.array_records:
        raise UpdateError(f"reply has no 'arrays' record; records found: {sorted(content.keys())}")
    if "metrics" not in content.metric_records:
        raise UpdateError(f"reply has no 'metrics' record; records found: {sorted(content.keys())}")
    got = content.array_records["arrays"]
    metrics = content.metric_records["metrics"]
    missing_metrics = [k for k in REQUIRED_TRAIN_METRICS if k not in metrics]
    if missing_metrics:
        raise UpdateError(f"reply lacks metrics {missing_metrics}")
    n = metrics["num-examples"]
    if not isinstance(n, int) or n <= 0:
        raise UpdateError(f"num-examples must be a positive integer, got {n!r}")
    check_tensor_names(expected.keys(), got.keys(), source="the update")
    for name, ref in expected.items():
        arr = got[name]
        if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
            raise UpdateError(
                f"tensor {name} is {arr.dtype}{list(arr.shape)}, expected {ref.dtype}{list(ref.shape)}"
            )
        values = arr.numpy()
        if not bool(_all_finite(values)):
            raise UpdateError(f"tensor {name} has NaN or Inf values")
    for key in ("train-loss", "epsilon"):
        value = metrics[key]
        if isinstance(value, float) and not math.isfinite(value):
            raise UpdateError(f"metric {key} is {value}")


def _all_finite(values) -> bool:  # type: ignore[no-untyped-def]
    import numpy as np

    return bool(np.isfinite(values).all())


def screen_train_replies(replies: list[Message], expected: ArrayRecord) -> tuple[list[Message], list[Rejection]]:
    """Split replies into accepted updates and rejections (site errors and malformed updates)."""
    accepted: list[Message] = []
    rejected: list[Rejection] = []
    for msg in replies:
        name = site_name(msg)
        if msg.has_error():
            rejected.append(Rejection(name, f"site error: {msg.error.reason}"))
            continue
        try:
            check_train_reply(msg, expected)
        except UpdateError as err:
            rejected.append(Rejection(name, f"rejected update: {err}"))
            continue
        accepted.append(msg)
    for r in rejected:
        logger.warning("round update from %s not used: %s", r.site, r.reason)
    return accepted, rejected


def arrays_nbytes(record: ArrayRecord) -> int:
    """Bytes of the serialized tensors (what travels, headers included)."""
    return sum(len(arr.data) for arr in record.values())
