"""Screening of site replies before aggregation: a bad update is rejected with a logged reason.

Pure logic over Flower messages; the round goes on with the updates that pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message

from fedtune.common.errors import UpdateError, check_tensor_names
from fedtune.common.messages import ARRAYS_RECORD, METRICS_RECORD, REFUSAL_ERROR_CODE, SITE_RECORD, Refusal, TrainReply

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Rejection:
    """An update not used: a site's refusal (its code) or the coordinator's own screening reason."""

    site: str
    reason: str
    code: str | None = None  # a site refusal's RefusalCode value


def rejection_of_error(msg: Message) -> Rejection:
    """A site's error reply as a rejection: its refusal code, or Flower's own error text."""
    refusal = Refusal.parse(msg.error.reason) if msg.error.code == REFUSAL_ERROR_CODE else None
    if refusal is not None:
        return Rejection(site_name(msg), f"site refused: {refusal.code.value}", refusal.code.value)
    return Rejection(site_name(msg), f"error {msg.error.code}: {msg.error.reason[:200]}")


def site_name(msg: Message) -> str:
    if msg.has_error():
        refusal = Refusal.parse(msg.error.reason) if msg.error.code == REFUSAL_ERROR_CODE else None
        if refusal is not None and refusal.site:
            return refusal.site
    elif SITE_RECORD in msg.content.config_records:
        return str(msg.content.config_records[SITE_RECORD].get("name", f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


def check_train_reply(msg: Message, expected: ArrayRecord) -> TrainReply:
    """The parsed reply, or UpdateError unless it carries a well-formed update for ``expected``."""
    content = msg.content
    if ARRAYS_RECORD not in content.array_records:
        raise UpdateError(f"reply has no '{ARRAYS_RECORD}' record; records found: {sorted(content.keys())}")
    if METRICS_RECORD not in content.metric_records:
        raise UpdateError(f"reply has no '{METRICS_RECORD}' record; records found: {sorted(content.keys())}")
    extra = sorted(set(content.keys()) - {ARRAYS_RECORD, METRICS_RECORD, SITE_RECORD})
    if extra:
        raise UpdateError(f"reply carries undeclared records {extra}")
    reply = TrainReply.from_metrics(site_name(msg), content.metric_records[METRICS_RECORD])
    got = content.array_records[ARRAYS_RECORD]
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
    return reply


def _all_finite(values) -> bool:  # type: ignore[no-untyped-def]
    import numpy as np

    return bool(np.isfinite(values).all())


def screen_train_replies(replies: list[Message], expected: ArrayRecord) -> tuple[list[tuple[Message, TrainReply]], list[Rejection]]:
    """Split replies into accepted updates (with their parsed replies) and rejections."""
    accepted: list[tuple[Message, TrainReply]] = []
    rejected: list[Rejection] = []
    for msg in replies:
        if msg.has_error():
            rejected.append(rejection_of_error(msg))
            continue
        try:
            accepted.append((msg, check_train_reply(msg, expected)))
        except UpdateError as err:
            rejected.append(Rejection(site_name(msg), f"rejected update: {err}"))
    for r in rejected:
        logger.warning("round update from %s not used: %s", r.site, r.reason)
    return accepted, rejected


def arrays_nbytes(record: ArrayRecord) -> int:
    """Bytes of the serialized tensors (what travels, headers included)."""
    return sum(len(arr.data) for arr in record.values())
