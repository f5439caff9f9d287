"""Secure aggregation at the coordinator: one training exchange run as Flower's SecAgg+ protocol.

Flower ships SecAgg+ (``SecAggPlusWorkflow``) only for its legacy path: the workflow reads a
``LegacyContext`` and asks a legacy strategy for fit instructions and for the final aggregate.
This module (with ``secagg_legacy.py``, Flower's legacy pieces it imports only for a secure
round) is the bridge, kept to what the protocol needs:

- the sites and their instructions come from fedtune's own strategy (``configure_train``), so
  sampling stays where it is; a tiny legacy strategy just hands them to the workflow and catches
  the unmasked aggregate;
- the tensors travel as an ordered list (legacy ``Parameters`` carry no names), so the names go
  along in the instructions and both ends check them;
- the workflow only logs "Secure aggregation halted"; here a stage that cannot finish raises
  :class:`SecureAggregationError` with the stage, the sites left and the threshold.

The coordinator sees the masked vectors, the sites' scalar metrics and the unmasked weighted
mean, never one site's adapter.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedtune.common.config import SecureAggConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.messages import ARRAY_NAMES_KEY

from .exchange import send_and_receive
from .screening import arrays_nbytes, site_name

logger = logging.getLogger(__name__)

# Flower's SecAgg+ masks live modulo 2**32.
MODULUS = 2**32


class SecureAggregationError(FedtuneError):
    """The SecAgg+ protocol could not finish a round: the coordinator has no aggregate."""


def threshold_for(num_sites: int) -> int:
    """Shares needed to unmask: a strict majority of the sampled sites, and at least 2."""
    return max(2, num_sites // 2 + 1)


def quantization_range_for(num_sites: int) -> int:
    """The finest power-of-two quantization whose sum over ``num_sites`` cannot wrap modulo 2**32.

    Capped at 2**30 because Flower's stochastic rounding casts to int32.
    """
    return min(2**30, 2 ** math.floor(math.log2((MODULUS - 1) / num_sites)))


def quantization_error_bound(weights: list[int], *, clipping_range: float, max_weight: int, quantization_range: int) -> float:
    """Largest possible |secure mean - exact mean| per value, from quantization alone.

    Each site rounds (stochastically) ``x * n_i / max_weight`` to a grid of step
    2c/Q; the mean divides the sum of those by the summed quantized weights, so the worst case is
    (number of sites) x step / (summed quantized weights / Q).
    """
    q_total = sum(round(n / max_weight * quantization_range) for n in weights)
    if q_total <= 0:
        return math.inf
    return len(weights) * 2 * clipping_range / q_total


@dataclass
class SecureRound:
    """What one secure training exchange gave the coordinator."""

    aggregate: ArrayRecord
    updates: list[Message]  # the masked-vector replies: site name and scalar metrics, arrays cleared
    errors: list[Message]  # error replies at any stage (refusals, dropouts)
    bytes_up: int
    bytes_down: int
    threshold: int
    quantization_range: int
    error_bound: float


def content_nbytes(content: RecordDict) -> int:
    """Bytes of tensors and byte strings in a message (the masked vectors travel as bytes)."""
    total = sum(arrays_nbytes(record) for record in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


class _RecordingGrid:
    """The run's grid, noting every reply and the bytes each way (the workflow only sends and receives)."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.replies: list[Message] = []
        self.bytes_up = 0
        self.bytes_down = 0

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.bytes_down += sum(content_nbytes(m.content) for m in messages)
        replies = send_and_receive(self._grid, messages, timeout=timeout)
        self.bytes_up += sum(content_nbytes(r.content) for r in replies if not r.has_error())
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def secure_train_round(
    grid: Any,
    messages: list[Message],
    *,
    server_round: int,
    expected: ArrayRecord,
    settings: SecureAggConfig,
    timeout: float,
) -> SecureRound:
    """Run the round's training exchange (``messages`` from the strategy) under SecAgg+."""
    # Flower's legacy server, imported only for a secure round.
    from flwr.common import FitIns, Parameters
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    from .secagg_legacy import HandOver, LoudSecAggPlus

    if len(messages) < 2:
        raise SecureAggregationError(
            f"secure aggregation needs at least 2 sampled sites (a sum over one site is its update), got {len(messages)}"
        )
    names = list(expected.keys())
    instructions = []
    for msg in messages:
        arrays = msg.content.array_records["arrays"]
        if list(arrays.keys()) != names:
            raise SecureAggregationError("the strategy's instructions do not carry the global adapter's tensors")
        config = dict(msg.content.config_records["config"])
        config[ARRAY_NAMES_KEY] = names
        params = Parameters(tensors=[arrays[k].data for k in names], tensor_type="numpy.ndarray")
        instructions.append((GridClientProxy(msg.metadata.dst_node_id, grid, grid.run.run_id), FitIns(params, config)))

    num_sites = len(messages)
    threshold = threshold_for(num_sites)
    quantization_range = quantization_range_for(num_sites)
    workflow = LoudSecAggPlus(
        num_shares=1.0,  # every sampled site holds a share of every other's keys
        reconstruction_threshold=threshold,
        max_weight=float(settings.max_weight),
        clipping_range=float(settings.clipping_range),
        quantization_range=quantization_range,
        modulus_range=MODULUS,
        timeout=timeout,
    )
    hand_over = HandOver(instructions)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: expected,
        }
    )
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}), strategy=hand_over
    )
    recording = _RecordingGrid(grid)
    try:
        workflow(recording, context)
    except SecureAggregationError as err:
        reasons = "; ".join(f"{site_name(m)}: {m.error.reason}" for m in recording.replies if m.has_error())
        raise SecureAggregationError(f"round {server_round}: {err}" + (f"; site errors: {reasons}" if reasons else "")) from None
    if hand_over.aggregate is None:
        raise SecureAggregationError("secure aggregation finished without an aggregate")

    aggregate = _named(hand_over.aggregate, expected, limit=2 * settings.clipping_range)
    updates = [m for m in recording.replies if not m.has_error() and "fitres.metrics" in m.content.config_records]
    errors = [m for m in recording.replies if m.has_error()]
    weights = [int(m.content.metric_records["fitres.num_examples"]["num_examples"]) for m in updates]
    bound = quantization_error_bound(
        weights, clipping_range=settings.clipping_range, max_weight=settings.max_weight, quantization_range=quantization_range
    )
    return SecureRound(
        aggregate=aggregate, updates=updates, errors=errors, bytes_up=recording.bytes_up, bytes_down=recording.bytes_down,
        threshold=threshold, quantization_range=quantization_range, error_bound=bound,
    )


def _named(parameters: Any, expected: ArrayRecord, *, limit: float) -> ArrayRecord:
    """The unmasked list of arrays, named and typed like the global adapter, or a loud error."""
    from flwr.common import parameters_to_ndarrays

    values = parameters_to_ndarrays(parameters)
    if len(values) != len(expected):
        raise SecureAggregationError(f"aggregate has {len(values)} tensors, expected {len(expected)}")
    out: OrderedDict[str, Array] = OrderedDict()
    for (name, ref), value in zip(expected.items(), values, strict=True):
        ref_np = ref.numpy()
        if tuple(value.shape) != tuple(ref_np.shape):
            raise SecureAggregationError(f"aggregate tensor {name} has shape {list(value.shape)}, expected {list(ref_np.shape)}")
        if not np.isfinite(value).all():
            raise SecureAggregationError(f"aggregate tensor {name} has NaN or Inf values")
        # A mean of values in [-c, c] stays there; far outside it, the masks did not cancel.
        if value.size and float(np.abs(value).max()) > limit:
            raise SecureAggregationError(
                f"aggregate tensor {name} reaches {float(np.abs(value).max()):.3g}, beyond the clipping range: "
                "the sites' masks did not cancel"
            )
        out[name] = Array.from_numpy_ndarray(np.ascontiguousarray(value, dtype=ref_np.dtype))
    return ArrayRecord(out)
