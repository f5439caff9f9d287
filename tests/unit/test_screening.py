"""Screening of site updates before aggregation, and aggregation against an independent oracle."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedtune.server.screening import arrays_nbytes, screen_train_replies

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SHAPES = {"a.lora_A.weight": (4, 8), "a.lora_B.weight": (8, 4), "classifier.weight": (3, 8)}
METRICS = {
    "num-examples": 10, "dp": 1, "epsilon": 1.0, "budget-epsilon": 8.0, "delta": 1e-5,
    "noise-multiplier": 1.0, "clip-norm": 1.0, "sample-rate": 0.1, "steps": 5,
}


def _arrays(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES, dtype=np.float32) -> ArrayRecord:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array.from_numpy_ndarray(rng.normal(size=s).astype(dtype)) for k, s in shapes.items()})


def _reply(arrays: ArrayRecord, *, name: str, n: int = 10, **metric_changes: float) -> Message:
    request = Message(RecordDict({"arrays": _arrays(0)}), dst_node_id=1, message_type=MessageType.TRAIN)
    metrics = MetricRecord({**METRICS, "num-examples": n, **metric_changes})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "site": ConfigRecord({"name": name})}), reply_to=request)


def _error_reply(reason: str) -> Message:
    request = Message(RecordDict({"arrays": _arrays(0)}), dst_node_id=1, message_type=MessageType.TRAIN)
    return Message(Error(code=100, reason=reason), reply_to=request)


def test_good_updates_pass_and_bad_ones_are_rejected_with_reasons() -> None:
    expected = _arrays(0)
    nan = _arrays(3)
    nan_arr = nan["classifier.weight"].numpy().copy()
    nan_arr[0, 0] = np.nan
    nan = ArrayRecord({**{k: v for k, v in nan.items()}, "classifier.weight": Array.from_numpy_ndarray(nan_arr)})
    replies = [
        _reply(_arrays(1), name="good-1"),
        _reply(_arrays(2, {k: s for k, s in SHAPES.items() if "classifier" not in k}), name="missing"),
        _reply(_arrays(4, {**SHAPES, "a.lora_A.weight": (2, 8)}), name="shape"),
        _reply(_arrays(5, dtype=np.float64), name="dtype"),
        _reply(nan, name="nan"),
        _reply(_arrays(6), name="zero-n", n=0),
        _reply(_arrays(8), name="undeclared", **{"label-count": 3.0}),
        _reply(_arrays(10), name="inf-epsilon", epsilon=float("inf")),
        _error_reply("budget-exhausted site=refusing"),
        _error_reply("a flower error"),
        _reply(_arrays(7), name="good-2"),
    ]

    accepted, rejected = screen_train_replies(replies, expected)

    assert [m.content["site"]["name"] for m, _ in accepted] == ["good-1", "good-2"]
    assert [reply.site for _, reply in accepted] == ["good-1", "good-2"]
    reasons = {r.site: r.reason for r in rejected}
    assert "missing: ['classifier.weight']" in reasons["missing"]
    assert "expected float32[4, 8]" in reasons["shape"]
    assert "float64" in reasons["dtype"]
    assert "NaN or Inf" in reasons["nan"]
    assert "num-examples must be a positive integer, got 0" in reasons["zero-n"]
    assert "undeclared keys ['label-count']" in reasons["undeclared"]
    assert "is inf" in reasons["inf-epsilon"]
    refusal = next(r for r in rejected if r.site == "refusing")
    assert refusal.code == "budget-exhausted"
    assert any(r.code is None and "a flower error" in r.reason for r in rejected)


def test_fedavg_over_screened_updates_matches_numpy_weighted_average() -> None:
    updates = [(_arrays(s), n) for s, n in ((1, 10), (2, 30), (3, 7))]
    replies = [_reply(a, name=f"s{i}", n=n) for i, (a, n) in enumerate(updates)]
    accepted, _ = screen_train_replies(replies, _arrays(0))

    aggregated, _ = FedAvg().aggregate_train(1, [m for m, _ in accepted])

    assert aggregated is not None
    for name in SHAPES:
        oracle = np.average([a[name].numpy() for a, _ in updates], axis=0, weights=[n for _, n in updates])
        np.testing.assert_allclose(aggregated[name].numpy(), oracle, rtol=1e-5, atol=1e-7)  # float32


def test_single_site_aggregate_is_that_site() -> None:
    update = _arrays(9)
    accepted, _ = screen_train_replies([_reply(update, name="only")], _arrays(0))
    aggregated, _ = FedAvg().aggregate_train(1, [m for m, _ in accepted])
    for name in SHAPES:
        np.testing.assert_allclose(aggregated[name].numpy(), update[name].numpy(), rtol=1e-7)


def test_bytes_on_the_wire_are_within_5_percent_of_raw_tensor_bytes() -> None:
    record = _arrays(0, {"lora_A": (8, 384), "lora_B": (384, 8), "head": (5, 384)})
    raw = sum(v.numpy().nbytes for v in record.values())
    assert raw <= arrays_nbytes(record) <= 1.05 * raw
