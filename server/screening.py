"""Screening of site replies before aggregation: a bad update is rejected with a logged reason.

Pure logic over Flower messages; the round goes on with the updates that pass. A reply passes
when its records and metrics are the declared ones (``common.messages``), every tensor of the
global adapter comes back with its name, dtype and shape (as declared *and* as decoded: the
header of a Flower Array is the sender's claim), every value is finite, and, with
``federation.max_update_norm`` > 0, the update (reply minus the global adapter the round
started from) has an L2 norm within the bound in each tensor group: LoRA A, LoRA B and the head
(everything else), each group over all its tensors together.

Why per group: a scaled or boosted update (the model-replacement attack of Bagdasaryan et al.,
"How To Backdoor Federated Learning", AISTATS 2020) is caught by a norm bound (Sun et al., "Can
You Really Backdoor Federated Learning?", 2019); the groups move at different scales (B starts at
zero under PEFT's init, the head is trained from scratch), so one bound over everything would
either miss a boosted A or reject an honest head. Why off by default: an honest update's norm
grows with the learning rate, the local steps and the group's size (Adam moves every coordinate by
up to about the learning rate per step), so no one number fits every run; an operator sets it from
the norms of honest rounds, which are logged at DEBUG per site and group.

Heterogeneous LoRA ranks (``common/lora_rank.py``): a site may reply at a lower rank r_i than
the global adapter's r (A: [r_i, in], B: [out, r_i], 1 <= r_i <= r), the same r_i in all its
LoRA tensors; names, the other dimensions, dtypes and finiteness are checked as ever.
:func:`screen_train_replies` then pads the accepted reply to rank r in the message itself, with
the values of the global adapter the round started from in the slots the site did not train,
before any rule (FedAvg, a robust rule, client-level DP, a server optimiser) sees it (HetLoRA-style
rank truncation with global-value padding: a site's update is zero in slots it did not train).
The norm bound is checked on the padded update, so a low-rank site is bounded on what it changed,
not on the global values of the slots it lacks.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedtune.common.errors import UpdateError, check_tensor_names
from fedtune.common.lora_rank import adapter_rank, likely_rank, pad_array, rank_dim, shape_at_rank, tensor_rank
from fedtune.common.messages import ARRAYS_RECORD, METRICS_RECORD, REFUSAL_ERROR_CODE, SITE_RECORD, Refusal, TrainReply

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Rejection:
    """An update not used: a site's refusal (its code) or the coordinator's own screening reason.

    ``kind`` says which, for the round line's ``sites_missing``: 'refused' (a site's refusal code),
    'crash' (Flower's error for a ClientApp that raised or died), 'offline' (the SuperLink's
    error for a node that missed its heartbeats), 'error' (another Flower error) or 'rejected'
    (screening refused the reply).
    """

    site: str
    reason: str
    code: str | None = None  # a site refusal's RefusalCode value
    kind: str = "rejected"


# Flower's error codes (flwr.common.constant.ErrorCode) for a ClientApp that failed to load, raised or died.
_CRASH_CODES = {1: "crash", 2: "crash", 8: "crash", 5: "offline"}


def rejection_of_error(msg: Message, name: str | None = None) -> Rejection:
    """A site's error reply as a rejection: its refusal code, or Flower's own error text.

    ``name``: the site's name when the coordinator knows it better than the reply does (Flower's
    own errors carry no site name).
    """
    refusal = Refusal.parse(msg.error.reason) if msg.error.code == REFUSAL_ERROR_CODE else None
    if refusal is not None:
        return Rejection(name or site_name(msg), f"site refused: {refusal.code.value}", refusal.code.value, kind="refused")
    kind = _CRASH_CODES.get(int(msg.error.code), "error")
    detail = _condensed(msg.error.reason)
    reason = f"{kind}: {detail}" if kind != "error" else f"error {msg.error.code}: {detail}"
    return Rejection(name or site_name(msg), reason, kind=kind)


def _condensed(text: str, limit: int = 300) -> str:
    """Flower's error text on one line, without terminal colours; a long one keeps its head (the
    exception's type) and its tail (the exception's message, last in a traceback)."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    return text if len(text) <= limit else f"{text[:limit // 3]} ... {text[-(2 * limit) // 3:]}"


def site_name(msg: Message) -> str:
    if msg.has_error():
        refusal = Refusal.parse(msg.error.reason) if msg.error.code == REFUSAL_ERROR_CODE else None
        if refusal is not None and refusal.site:
            return refusal.site
    elif SITE_RECORD in msg.content.config_records:
        return str(msg.content.config_records[SITE_RECORD].get("name", f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


TENSOR_GROUPS = ("lora_A", "lora_B", "head")


def tensor_group(name: str) -> str:
    """The group a tensor's update norm is bounded in: 'lora_A', 'lora_B' or 'head' (every other tensor)."""
    if "lora_A" in name or "lora_embedding_A" in name:
        return "lora_A"
    if "lora_B" in name or "lora_embedding_B" in name:
        return "lora_B"
    return "head"


def group_update_norms(update: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> dict[str, float]:
    """L2 norm of (update - expected) per tensor group, over all of a group's tensors together (float64).

    Only groups that have tensors appear (e.g. no 'lora_A' under FFA-LoRA, where A is not exchanged).
    """
    squares: dict[str, list[float]] = {}
    for name, ref in expected.items():
        diff = np.asarray(update[name], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        squares.setdefault(tensor_group(name), []).append(float(np.vdot(diff, diff)))
    return {group: math.sqrt(math.fsum(parts)) for group, parts in squares.items()}


def _decode(name: str, arr: Array, ref: Array, shape: tuple[int, ...], rank_hint: str = "") -> np.ndarray:
    """The tensor as numpy, or UpdateError: its declared and decoded dtype must be the global's and its shape ``shape``."""
    if tuple(arr.shape) != shape or arr.dtype != ref.dtype:
        raise UpdateError(f"tensor {name} is {arr.dtype}{list(arr.shape)}, expected {ref.dtype}{list(shape)}{rank_hint}")
    try:
        values = arr.numpy()
    except (ValueError, TypeError, OSError, EOFError) as err:  # np.load on bytes the sender chose
        raise UpdateError(f"tensor {name} cannot be decoded as {arr.stype!r}: {type(err).__name__}") from None
    if values.shape != shape or str(values.dtype) != ref.dtype:
        # The header is the sender's claim; what aggregation uses is what decodes.
        raise UpdateError(
            f"tensor {name} declares {arr.dtype}{list(arr.shape)} but decodes to {values.dtype}{list(values.shape)}"
        )
    return values


def _reply_rank(got: ArrayRecord, expected: ArrayRecord) -> int | None:
    """The LoRA rank r_i a reply is at: the rank most of its LoRA tensors declare, among the shapes
    that are the global's at a rank 1 <= r_i <= r; None without LoRA tensors. Tensors off it are
    rejected by :func:`_decode`, naming the shape found and the one allowed."""
    ranks = []
    for name, ref in expected.items():
        full = tensor_rank(name, ref.shape)
        have = tensor_rank(name, got[name].shape)
        if full is None or have is None or not 1 <= have <= full:
            continue
        if tuple(got[name].shape) == shape_at_rank(name, ref.shape, have):
            ranks.append(have)
    if ranks:
        return likely_rank(ranks)
    return next((r for name, ref in expected.items() if (r := tensor_rank(name, ref.shape)) is not None), None)


def _check_reply(msg: Message, expected: ArrayRecord, max_update_norm: float) -> tuple[TrainReply, dict[str, np.ndarray], int | None]:
    """:func:`check_train_reply`, also returning the values padded to the global shapes (global values in
    the slots a lower-rank reply lacks) and the reply's LoRA rank."""
    content = msg.content
    if ARRAYS_RECORD not in content.array_records:
        raise UpdateError(f"reply has no '{ARRAYS_RECORD}' record; records found: {sorted(content.keys())}")
    if METRICS_RECORD not in content.metric_records:
        raise UpdateError(f"reply has no '{METRICS_RECORD}' record; records found: {sorted(content.keys())}")
    extra = sorted(set(content.keys()) - {ARRAYS_RECORD, METRICS_RECORD, SITE_RECORD})
    if extra:
        raise UpdateError(f"reply carries undeclared records {extra}")
    site = site_name(msg)
    reply = TrainReply.from_metrics(site, content.metric_records[METRICS_RECORD])
    got = content.array_records[ARRAYS_RECORD]
    check_tensor_names(expected.keys(), got.keys(), source="the update")
    rank = _reply_rank(got, expected)
    glob = {name: ref.numpy() for name, ref in expected.items()}
    values: dict[str, np.ndarray] = {}
    for name, ref in expected.items():
        full = tensor_rank(name, ref.shape)
        shape, hint = tuple(ref.shape), ""
        if full is not None and rank is not None:
            shape = shape_at_rank(name, ref.shape, rank)
            pattern = ", ".join("r" if d == rank_dim(name) else str(n) for d, n in enumerate(ref.shape))
            hint = (f" (a LoRA tensor is {ref.dtype}[{pattern}] for one rank 1 <= r <= {full} shared by all of a reply's "
                    f"LoRA tensors; most of this reply's are at r = {rank})")
        decoded = _decode(name, got[name], ref, shape, hint)
        if not _all_finite(decoded):
            raise UpdateError(f"tensor {name} has NaN or Inf values")
        values[name] = pad_array(name, decoded, glob[name])
    if max_update_norm > 0:
        norms = group_update_norms(values, glob)
        logger.debug("update norms from %s: %s", site, {g: round(v, 6) for g, v in norms.items()})
        over = {g: v for g, v in norms.items() if not v <= max_update_norm}
        if over:
            group, norm = next(iter(over.items()))
            raise UpdateError(
                f"site {site}: {group} update norm {norm:.6g} exceeds the bound {max_update_norm:g} "
                f"(federation.max_update_norm; groups over it: {sorted(over)})"
            )
    return reply, values, rank


def check_train_reply(msg: Message, expected: ArrayRecord, *, max_update_norm: float = 0.0) -> TrainReply:
    """The parsed reply, or UpdateError unless it carries a well-formed update for ``expected``.

    A reply at a lower LoRA rank passes (see the module docstring); this function leaves the
    message as it is, :func:`screen_train_replies` pads it.

    Args:
        msg: a site's reply to a train message.
        expected: the global adapter the round started from.
        max_update_norm: the bound on each tensor group's update norm (see the module docstring),
            checked on the update padded to the global rank (zero in the slots a lower-rank reply lacks); 0: off.
    """
    return _check_reply(msg, expected, max_update_norm)[0]


def _all_finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all())


def screen_train_replies(
    replies: list[Message], expected: ArrayRecord, *, max_update_norm: float = 0.0, name_of: Callable[[Message], str] | None = None
) -> tuple[list[tuple[Message, TrainReply]], list[Rejection]]:
    """Split replies into accepted updates (with their parsed replies) and rejections (logged with the site and reason).

    ``max_update_norm`` > 0 bounds each tensor group's update norm (:func:`check_train_reply`).
    ``name_of`` names the site of a reply (the coordinator's memory of node ids; default :func:`site_name`).
    An accepted reply at a lower LoRA rank r_i has its arrays replaced, in the message, by their
    padding to the global rank with ``expected``'s values: whatever reads the accepted messages sees rank-r
    adapters, unchanged in the slots a site did not train.
    """
    accepted: list[tuple[Message, TrainReply]] = []
    rejected: list[Rejection] = []
    full = adapter_rank({name: arr.shape for name, arr in expected.items()})
    for msg in replies:
        if msg.has_error():
            rejected.append(rejection_of_error(msg, name_of(msg) if name_of else None))
            continue
        try:
            reply, values, rank = _check_reply(msg, expected, max_update_norm)
            if rank is not None and full is not None and rank < full:
                logger.info("site %s trained LoRA rank %d of %d: its reply is padded with the global values", reply.site, rank, full)
                msg.content[ARRAYS_RECORD] = ArrayRecord(OrderedDict((k, Array.from_numpy_ndarray(v)) for k, v in values.items()))
            accepted.append((msg, reply))
        except UpdateError as err:
            rejected.append(Rejection(name_of(msg) if name_of else site_name(msg), f"rejected update: {err}"))
    for r in rejected:
        logger.warning("round update from %s not used: %s", r.site, r.reason)
    return accepted, rejected


def arrays_nbytes(record: ArrayRecord) -> int:
    """Bytes of the serialized tensors (what travels, headers included)."""
    return sum(len(arr.data) for arr in record.values())
