"""Screening of site updates before aggregation (names, shapes, dtypes, finite values, a norm bound per
tensor group), FedAvg against an independent oracle, and fuzzing of reply decoding and screening."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedtune.common.config import from_dict
from fedtune.common.errors import ConfigError, UpdateError
from fedtune.common.messages import TRAIN_REPLY_KEYS, TrainReply
from fedtune.server.screening import arrays_nbytes, check_train_reply, group_update_norms, screen_train_replies, tensor_group

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


# ---------------------------------------------------------------------------------------------
# A norm bound per tensor group, on the update (reply minus the global adapter)
# ---------------------------------------------------------------------------------------------

GROUP_OF = {"a.lora_A.weight": "lora_A", "a.lora_B.weight": "lora_B", "classifier.weight": "head"}


def _shifted(base: ArrayRecord, shift: dict[str, float]) -> ArrayRecord:
    """``base`` plus an update whose every coordinate in group g is shift[g] (norm: shift[g] * sqrt(size of g))."""
    return ArrayRecord(
        {k: Array.from_numpy_ndarray(v.numpy() + np.float32(shift.get(GROUP_OF[k], 0.0))) for k, v in base.items()}
    )


def _oracle_group_norms(got: ArrayRecord, expected: ArrayRecord) -> dict[str, float]:
    parts: dict[str, list[np.ndarray]] = {}
    for k in SHAPES:
        parts.setdefault(GROUP_OF[k], []).append((got[k].numpy().astype(np.float64) - expected[k].numpy().astype(np.float64)).ravel())
    return {g: float(np.linalg.norm(np.concatenate(p))) for g, p in parts.items()}


def test_update_norm_bound_rejects_a_group_over_it_naming_site_group_norm_and_bound() -> None:
    # Prepare: every group has 32, 32 and 24 coordinates; a shift of 0.25 per coordinate in lora_A
    # is a norm of 0.25 * sqrt(32) = 1.414; the bound is 2.
    expected = _arrays(0)
    replies = [
        _reply(_shifted(expected, {"lora_A": 0.25, "lora_B": 0.25, "head": 0.25}), name="honest"),
        _reply(_shifted(expected, {"lora_B": 0.5}), name="boosted-b"),  # 0.5 * sqrt(32) = 2.83
        _reply(_shifted(expected, {"head": -1.0}), name="flipped-head"),  # sqrt(24) = 4.90
        _reply(_shifted(expected, {}), name="zero"),
    ]

    # Execute
    accepted, rejected = screen_train_replies(replies, expected, max_update_norm=2.0)

    # Assert
    assert [reply.site for _, reply in accepted] == ["honest", "zero"]
    reasons = {r.site: r.reason for r in rejected}
    norms_b = _oracle_group_norms(replies[1].content.array_records["arrays"], expected)
    norms_h = _oracle_group_norms(replies[2].content.array_records["arrays"], expected)
    assert f"site boosted-b: lora_B update norm {norms_b['lora_B']:.6g} exceeds the bound 2 (federation.max_update_norm" in reasons["boosted-b"]
    assert f"site flipped-head: head update norm {norms_h['head']:.6g} exceeds the bound 2" in reasons["flipped-head"]
    assert norms_b["lora_B"] == pytest.approx(0.5 * np.sqrt(32), rel=1e-6)


def test_update_norm_bound_zero_is_off_and_the_bound_itself_passes() -> None:
    expected = _arrays(0)
    huge = _reply(_shifted(expected, {"lora_A": 1e6}), name="huge")
    at_bound = _shifted(expected, {"head": 0.5})
    norm = _oracle_group_norms(at_bound, expected)["head"]

    off, _ = screen_train_replies([huge], expected)
    on, rejected = screen_train_replies([_reply(at_bound, name="edge")], expected, max_update_norm=norm)

    assert [r.site for _, r in off] == ["huge"]
    assert [r.site for _, r in on] == ["edge"] and not rejected


def test_group_update_norms_match_numpy_per_group() -> None:
    expected, got = _arrays(0), _arrays(1)

    norms = group_update_norms({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in expected.items()})

    assert norms == pytest.approx(_oracle_group_norms(got, expected), rel=1e-12)
    assert [tensor_group(n) for n in ("m.q.lora_A.default.weight", "m.q.lora_B.weight", "m.classifier.bias", "m.pooler.dense.weight")] == [
        "lora_A", "lora_B", "head", "head"]


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_max_update_norm_must_be_finite_and_non_negative(value: float) -> None:
    with pytest.raises(ConfigError, match=r"federation.max_update_norm must be a finite number >= 0 \(0: off\), got"):
        from_dict({"federation": {"max_update_norm": value}})


def test_round_goes_on_without_the_site_over_the_bound(tmp_path: Path) -> None:
    # Prepare: the real round loop and FedAvg; site 3 boosts its update 100 times.
    from .test_aggregation import FakeSitesGrid, _run

    glob = {k: v.numpy().astype(np.float64) for k, v in _arrays(0).items()}
    sent = {n: {k: glob[k] + 0.01 * v.numpy() for k, v in _arrays(n).items()} for n in (1, 2, 3)}
    sent[3] = {k: glob[k] + 100 * (sent[3][k] - glob[k]) for k in glob}
    strategy = FedAvg(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)

    # Execute
    final, line = _run(strategy, FakeSitesGrid(lambda node, _: {"arrays": sent[node], "n": 10 * node}, [1, 2, 3]), glob, tmp_path,
                       max_update_norm=1.0)

    # Assert: FedAvg over sites 1 and 2 only, weighted 10 : 20
    assert line["sites_replied"] == 2 and [r["site"] for r in line["sites_rejected"]] == ["site-3"]
    assert "update norm" in line["sites_rejected"][0]["reason"] and "exceeds the bound 1" in line["sites_rejected"][0]["reason"]
    for k in glob:
        want = np.average([sent[1][k], sent[2][k]], axis=0, weights=[10, 20])
        np.testing.assert_allclose(final[k].numpy(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# What a tensor header claims is checked against what decodes
# ---------------------------------------------------------------------------------------------


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (Array("float32", (4, 8), "numpy.ndarray", _npy(np.zeros((2, 16), np.float32))), "declares float32[4, 8] but decodes to float32[2, 16]"),
        (Array("float32", (4, 8), "numpy.ndarray", _npy(np.zeros((4, 8), np.float64))), "declares float32[4, 8] but decodes to float64[4, 8]"),
        (Array("float32", (4, 8), "numpy.ndarray", b"\x93NUMPY garbage"), "cannot be decoded as 'numpy.ndarray'"),
        (Array("float32", (4, 8), "torch.Tensor", _npy(np.zeros((4, 8), np.float32))), "cannot be decoded as 'torch.Tensor'"),
    ],
)
def test_a_tensor_whose_header_lies_is_rejected(array: Array, reason: str) -> None:
    expected = _arrays(0)
    lying = ArrayRecord({**dict(expected.items()), "a.lora_A.weight": array})

    accepted, rejected = screen_train_replies([_reply(lying, name="liar")], expected)

    assert not accepted
    assert reason in rejected[0].reason


# ---------------------------------------------------------------------------------------------
# Fuzz: decoding and screening fail only with UpdateError
# ---------------------------------------------------------------------------------------------

FULL_METRICS = {
    **METRICS, "val-mode": 1, "val-examples": 12.0, "val-loss": 0.7, "val-accuracy": 0.5, "val-noise-std": 1.0,
    "val-epsilon": 0.1, "train-loss": 0.6, "clipped-fraction": 0.2, "train-seconds": 3.0,
}
_ANY_VALUE = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=5),
    st.lists(st.integers(-5, 5), max_size=3), st.binary(max_size=4), st.sampled_from([1, 2, 3, 0, -1]),
)
_RECORD_VALUE = st.one_of(  # what a MetricRecord holds (no bools)
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True), max_size=3), st.sampled_from([1, 2, 3, 0, -1]),
)
_KEYS = st.one_of(st.sampled_from(sorted(TRAIN_REPLY_KEYS)), st.text(max_size=8))


def _mutated_metrics(values: st.SearchStrategy) -> st.SearchStrategy:  # type: ignore[type-arg]
    """A full, valid train reply's metrics with keys dropped, values replaced and keys added."""
    return st.builds(
        lambda drop, changes, extra: {**{k: v for k, v in FULL_METRICS.items() if k not in drop}, **changes, **extra},
        st.sets(st.sampled_from(sorted(FULL_METRICS))),
        st.dictionaries(st.sampled_from(sorted(FULL_METRICS)), values, max_size=4),
        st.dictionaries(_KEYS, values, max_size=2),
    )


@settings(max_examples=400, deadline=None)
@given(metrics=_mutated_metrics(_ANY_VALUE))
def test_fuzz_train_reply_decoding_raises_only_update_error(metrics: dict) -> None:  # type: ignore[type-arg]
    try:
        reply = TrainReply.from_metrics("fuzz", metrics)
    except UpdateError:
        return
    assert reply.weight > 0 and set(metrics) <= TRAIN_REPLY_KEYS


_FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def _fuzzed_tensor(draw: st.DrawFn, name: str, shape: tuple[int, ...]) -> Array | None:
    kind = draw(st.sampled_from(["good", "good", "good", "missing", "shape", "dtype", "bytes", "lying", "stype"]))
    good = draw(hnp.arrays(np.float32, shape, elements=_FLOAT32))
    if kind == "missing":
        return None
    if kind == "shape":
        return Array.from_numpy_ndarray(good.reshape(-1))
    if kind == "dtype":
        with np.errstate(invalid="ignore", over="ignore"):  # NaN cast to int is the point
            return Array.from_numpy_ndarray(good.astype(draw(st.sampled_from([np.float16, np.float64, np.int32, np.bool_]))))
    if kind == "bytes":
        return Array("float32", shape, "numpy.ndarray", draw(st.binary(max_size=200)))
    if kind == "lying":
        return Array("float32", shape, "numpy.ndarray", _npy(good.reshape(-1)[: draw(st.integers(0, good.size))]))
    if kind == "stype":
        return Array("float32", shape, draw(st.text(max_size=6)), good.tobytes())
    return Array.from_numpy_ndarray(good)


@st.composite
def _fuzzed_reply(draw: st.DrawFn) -> Message:
    tensors = {}
    for name, shape in SHAPES.items():
        arr = draw(_fuzzed_tensor(name, shape))
        if arr is not None:
            tensors[name] = arr
    if draw(st.integers(0, 9)) == 9:
        tensors[draw(st.text(min_size=1, max_size=6))] = Array.from_numpy_ndarray(np.zeros(2, np.float32))
    # Valid metrics two times in three, so that most examples reach the tensors.
    metrics = draw(st.one_of(st.just(METRICS), st.just(FULL_METRICS), _mutated_metrics(_RECORD_VALUE)))
    records: dict = {"arrays": ArrayRecord(tensors), "metrics": MetricRecord(metrics)}  # type: ignore[type-arg, arg-type]
    if draw(st.booleans()):
        records["site"] = ConfigRecord({"name": draw(st.text(max_size=6))})
    structure = draw(st.sampled_from(["declared", "declared", "declared", "no-arrays", "no-metrics", "extra-record"]))
    if structure in ("no-arrays", "no-metrics"):
        records.pop(structure.removeprefix("no-"))
    elif structure == "extra-record":
        records["extra"] = ConfigRecord({"x": 1})
    request = Message(RecordDict({"arrays": _arrays(0)}), dst_node_id=1, message_type=MessageType.TRAIN)
    return Message(RecordDict(records), reply_to=request)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(reply=_fuzzed_reply(), bound=st.sampled_from([0.0, 1e-3, 1.0, 1e30]))
def test_fuzz_screening_raises_only_update_error(reply: Message, bound: float) -> None:
    expected = _arrays(0)
    try:
        parsed = check_train_reply(reply, expected, max_update_norm=bound)
    except UpdateError:
        return
    # Accepted: every tensor decodes to the global's dtype and shape, finite, within the bound.
    got = reply.content.array_records["arrays"]
    for name, ref in expected.items():
        values = got[name].numpy()
        assert values.dtype == np.float32 and values.shape == ref.numpy().shape and np.isfinite(values).all()
    if bound > 0:
        assert max(_oracle_group_norms(got, expected).values()) <= bound
    assert parsed.weight > 0
