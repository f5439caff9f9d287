"""Secure aggregation: Flower's real SecAgg+ workflow and client mod, through fedtune's bridges.

The messages travel through an in-process grid that hands each one to the real ClientApp of its
site (the transport is the only stand-in; the protocol, its cryptography and the bridges are real).
"""

from __future__ import annotations

import copy
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.secure_aggregation.secaggplus_constants import Key

from fedtune.client.app import SECAGG_RECORD, build_client_app
from fedtune.client.site_request import SiteReply
from fedtune.common.config import SecureAggConfig, from_dict
from fedtune.common.errors import ConfigError, PrivacyBudgetError
from fedtune.common.messages import Refusal, RefusalCode
from fedtune.server.secure_agg import (
    SecureAggregationError,
    quantization_error_bound,
    quantization_range_for,
    secure_train_round,
    threshold_for,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SHAPES = {"a.lora_A.weight": (4, 6), "a.lora_B.weight": (6, 4), "classifier.weight": (3, 6)}


class InProcessGrid:
    """Delivers each message to its site's ClientApp; ``drop(node, stage)`` makes a site vanish."""

    def __init__(self, sites: dict[int, Context], drop: Callable[[int, str], bool] = lambda node, stage: False) -> None:
        from flwr.supercore.run import Run

        self.run = Run.create_empty(7)
        self.app = build_client_app()
        self.sites = sites
        self.drop = drop
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._waiting: list[Message] = []

    def push_messages(self, messages: Any) -> list[str]:
        """Deliver at once; the replies wait for ``pull_messages`` as on a real SuperLink."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # the SuperLink assigns ids on push
            ids.append(msg.metadata.message_id)
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            stage = str(msg.content.config_records[SECAGG_RECORD].get("stage", "")) if SECAGG_RECORD in msg.content.config_records else ""
            if self.drop(node, stage):
                continue
            # A copy, as a real transport delivers: the mod edits what it receives.
            self._waiting.append(self.app(copy.deepcopy(msg), self.sites[node]))
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        ready = [m for m in self._waiting if m.metadata.reply_to_message_id in set(message_ids)]
        self._waiting = [m for m in self._waiting if m not in ready]
        self.replies += ready
        return ready

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        from fedtune.server.exchange import send_and_receive

        return send_and_receive(self, messages, timeout=timeout)


def _contexts(nodes: list[int], node_config: Callable[[int], dict[str, Any]] = lambda n: {}) -> dict[int, Context]:
    return {n: Context(run_id=7, node_id=n, node_config=node_config(n), state=RecordDict(), run_config={}) for n in nodes}


def _messages(nodes: list[int], arrays: ArrayRecord, config: dict[str, Any]) -> list[Message]:
    return [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))}), dst_node_id=n, message_type=MessageType.TRAIN)
        for n in nodes
    ]


def _global() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(OrderedDict((k, Array.from_numpy_ndarray(rng.normal(0, 0.05, s).astype(np.float32))) for k, s in SHAPES.items()))


def _update(node: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(100 + node)
    return OrderedDict((k, rng.normal(0, 0.3, s).astype(np.float32)) for k, s in SHAPES.items())


WEIGHTS = {11: 120, 22: 300, 33: 57, 44: 200}
# A declared TrainReply (common/messages.py): the bridge checks every reply before it leaves.
METRICS = {"dp": 1, "epsilon": 1.0, "budget-epsilon": 8.0, "delta": 1e-5, "noise-multiplier": 1.1,
           "clip-norm": 1.0, "sample-rate": 0.5, "steps": 4}


@pytest.fixture
def stub_sites(monkeypatch: pytest.MonkeyPatch) -> dict[int, Any]:
    """Sites whose training is replaced by a fixed update (or a refusal), to test the protocol alone."""
    behaviour: dict[int, Any] = {}

    def fake_site_reply(context: Context, kind: str, overrides: Any, arrays: Any, config: Any) -> SiteReply:
        node = int(context.node_id)
        if isinstance(behaviour.get(node), Exception):
            raise behaviour[node]
        update = behaviour.get(node) or _update(node)
        assert list(arrays.keys()) == list(SHAPES), "the bridge hands the handler the tensors by name"
        return SiteReply(site=f"site-{node}", metrics={"num-examples": WEIGHTS[node], **METRICS}, arrays=update)

    monkeypatch.setattr("fedtune.client.secure_agg.site_reply", fake_site_reply)
    return behaviour


def _fedavg(nodes: list[int], updates: dict[int, OrderedDict[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    updates = updates or {n: _update(n) for n in nodes}
    total = sum(WEIGHTS[n] for n in nodes)
    return {k: sum(updates[n][k].astype(np.float64) * WEIGHTS[n] for n in nodes) / total for k in SHAPES}


def _run(grid: InProcessGrid, nodes: list[int], settings: SecureAggConfig | None = None):  # type: ignore[no-untyped-def]
    return secure_train_round(
        grid, _messages(nodes, _global(), {"server-round": 1}), server_round=1, expected=_global(),
        settings=settings or SecureAggConfig(enabled=True), timeout=30,
    )


def test_secure_mean_matches_fedavg_within_the_quantization_bound(stub_sites: dict[int, Any]) -> None:
    nodes = [11, 22, 33]
    outcome = _run(InProcessGrid(_contexts(nodes)), nodes)

    exact = _fedavg(nodes)
    assert outcome.error_bound < 1e-4
    for name, arr in outcome.aggregate.items():
        got = arr.numpy()
        assert got.dtype == np.float32 and got.shape == SHAPES[name]
        assert np.abs(got - exact[name]).max() <= outcome.error_bound + 1e-6, name
    assert sorted(int(m.metadata.src_node_id) for m in outcome.updates) == nodes
    assert outcome.threshold == 2 and not outcome.errors


def test_coordinator_never_receives_a_site_adapter(stub_sites: dict[int, Any]) -> None:
    nodes = [11, 22, 33]
    grid = InProcessGrid(_contexts(nodes))
    _run(grid, nodes)

    assert len(grid.replies) == 4 * len(nodes), "four protocol stages"
    seen_masked = 0
    plain = {n: np.concatenate([v.ravel() for v in _update(n).values()]) for n in nodes}
    for reply in grid.replies:
        assert not reply.has_error()
        for record in reply.content.array_records.values():
            assert len(record) == 0, "the masked-vector stage clears the adapter tensors"
        masked = reply.content.config_records[SECAGG_RECORD].get(Key.MASKED_PARAMETERS)
        if masked is not None:
            seen_masked += 1
            from flwr.common import bytes_to_ndarray

            vector = np.concatenate([bytes_to_ndarray(b).ravel() for b in masked])
            # Masked integers modulo 2**32: nothing like the site's float adapter, and spread over the range.
            assert vector.dtype.kind in "iu" and vector.max() > 2**31
            own = plain[int(reply.metadata.src_node_id)]
            assert not np.allclose(vector[1 : 1 + own.size].astype(np.float64), own, atol=1)
            metrics = reply.content.config_records["fitres.metrics"]
            assert all(isinstance(v, (int, float)) for v in metrics.values()), "only scalar metrics"
    assert seen_masked == len(nodes)


def test_a_site_dropping_out_within_the_threshold_leaves_the_mean_of_the_others(stub_sites: dict[int, Any]) -> None:
    nodes = [11, 22, 33, 44]
    # Site 33 vanishes after sharing its keys: the others' shares remove its masks.
    grid = InProcessGrid(_contexts(nodes), drop=lambda node, stage: node == 33 and stage in {"collect_masked_vectors", "unmask"})
    outcome = _run(grid, nodes)

    exact = _fedavg([11, 22, 44])
    for name, arr in outcome.aggregate.items():
        assert np.abs(arr.numpy() - exact[name]).max() <= outcome.error_bound + 1e-6, name
    assert outcome.threshold == 3


def _code(reply: Message) -> RefusalCode | None:
    parsed = Refusal.parse(reply.error.reason)
    return parsed.code if parsed else None


def test_a_refusing_site_is_a_dropout_with_its_refusal_code(stub_sites: dict[int, Any]) -> None:
    nodes = [11, 22, 33, 44]
    stub_sites[22] = PrivacyBudgetError("privacy budget exhausted: spent 8, budget 8", budget=8.0, spent=8.0, requested=0.5)
    outcome = _run(InProcessGrid(_contexts(nodes)), nodes)

    exact = _fedavg([11, 33, 44])
    for name, arr in outcome.aggregate.items():
        assert np.abs(arr.numpy() - exact[name]).max() <= outcome.error_bound + 1e-6
    assert [m.metadata.src_node_id for m in outcome.errors] == [22]
    assert _code(outcome.errors[0]) is RefusalCode.BUDGET_EXHAUSTED
    assert "spent 8" not in outcome.errors[0].error.reason, "the details stay in the site's log"


def test_an_adapter_outside_the_clipping_range_is_refused_not_clipped(stub_sites: dict[int, Any]) -> None:
    nodes = [11, 22, 33, 44]
    big = _update(44)
    big["classifier.weight"][0, 0] = 9.5
    stub_sites[44] = big
    outcome = _run(InProcessGrid(_contexts(nodes)), nodes)

    assert [m.metadata.src_node_id for m in outcome.errors] == [44]
    assert _code(outcome.errors[0]) is RefusalCode.SECURE_AGG_RANGE
    assert "9.5" not in outcome.errors[0].error.reason, "the site's values stay in its log"
    exact = _fedavg([11, 22, 33])
    for name, arr in outcome.aggregate.items():
        assert np.abs(arr.numpy() - exact[name]).max() <= outcome.error_bound + 1e-6


def test_a_site_above_the_max_weight_is_refused(stub_sites: dict[int, Any]) -> None:
    nodes = [11, 22, 33]
    outcome = _run(InProcessGrid(_contexts(nodes)), nodes, SecureAggConfig(enabled=True, max_weight=250))
    assert [m.metadata.src_node_id for m in outcome.errors] == [22]
    assert _code(outcome.errors[0]) is RefusalCode.SECURE_AGG_MAX_WEIGHT


def test_too_many_dropouts_fail_the_round_loudly(stub_sites: dict[int, Any]) -> None:
    nodes = [11, 22, 33]
    grid = InProcessGrid(_contexts(nodes), drop=lambda node, stage: node in (22, 33) and stage == "collect_masked_vectors")
    with pytest.raises(SecureAggregationError, match="collect masked vectors.*1 of 3.*2 needed"):
        _run(grid, nodes)


def test_masks_that_do_not_cancel_fail_loudly(stub_sites: dict[int, Any]) -> None:
    nodes = [11, 22, 33]

    class Tampering(InProcessGrid):
        def pull_messages(self, message_ids: Any) -> list[Message]:
            replies = super().pull_messages(message_ids)
            for reply in replies:
                cfg = reply.content.config_records[SECAGG_RECORD]
                if Key.MASKED_PARAMETERS in cfg and reply.metadata.src_node_id == 22:
                    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

                    vectors = [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]
                    vectors[2] = (vectors[2] + 2**31) % 2**32  # a corrupted masked vector
                    cfg[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v) for v in vectors]
            return replies

    with pytest.raises(SecureAggregationError, match="masks did not cancel"):
        _run(Tampering(_contexts(nodes)), nodes)


def test_one_site_cannot_be_securely_aggregated(stub_sites: dict[int, Any]) -> None:
    with pytest.raises(SecureAggregationError, match="at least 2"):
        _run(InProcessGrid(_contexts([11])), [11])


@pytest.mark.parametrize("sites", [2, 3, 4, 5, 16, 100, 1000])
def test_quantization_cannot_wrap_and_threshold_is_a_majority(sites: int) -> None:
    q = quantization_range_for(sites)
    assert q & (q - 1) == 0 and q <= 2**30
    assert sites * q < 2**32, "the unmasked sum of quantized values stays below the modulus"
    assert 2 * q * sites >= 2**32 or q == 2**30, "and the range is the finest that fits"
    t = threshold_for(sites)
    assert t > sites / 2 and t >= 2


def test_error_bound_shrinks_with_finer_quantization() -> None:
    coarse = quantization_error_bound([100, 200], clipping_range=8.0, max_weight=100_000, quantization_range=2**22)
    fine = quantization_error_bound([100, 200], clipping_range=8.0, max_weight=100_000, quantization_range=2**30)
    assert fine == pytest.approx(coarse / 2**8, rel=1e-3)


def test_secure_agg_and_client_dp_cannot_be_combined() -> None:
    with pytest.raises(ConfigError, match="cannot be combined"):
        from_dict({"secure_agg": {"enabled": True}, "client_dp": {"enabled": True}})
    with pytest.raises(ConfigError, match="min_sites >= 2"):
        from_dict({"secure_agg": {"enabled": True}, "federation": {"min_sites": 1}})


def test_secagg_record_name_is_flowers() -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    assert SECAGG_RECORD == RECORD_KEY_CONFIGS


def test_real_site_training_through_secagg_matches_plain_fedavg(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Real ClientApps train a tiny model; the secure mean equals FedAvg of the same sites' plain replies."""
    from fedtune.common.model import adapter_state, build_model
    from fedtune.common.sitedata import load_config_table, run_labels

    run = from_dict({
        "model": {"base_model": str(tiny_model_dir), "max_length": 32}, "federation": {"sites": 3, "rounds": 2},
        "train": {"batch_size": 128, "local_epochs": 1.0}, "secure_agg": {"enabled": True},
    })
    labels = run_labels(run.data, load_config_table(run.data))
    initial = ArrayRecord(adapter_state(build_model(run.model, run.lora, len(labels), seed=run.seed).model))
    nodes = [1, 2, 3]

    def contexts() -> dict[int, Context]:
        return {n: Context(run_id=7, node_id=n, node_config={"partition-id": n - 1, "num-partitions": 3}, state=RecordDict(),
                           run_config=run.to_flat()) for n in nodes}

    def config(run_dir: Path) -> dict[str, Any]:
        return {"server-round": 1, "num-rounds": 2, "labels": labels, "run-dir": str(run_dir)}

    # Plain replies (their own run directory, so their own fresh ledgers).
    plain_grid = InProcessGrid(contexts())
    plain = plain_grid.send_and_receive(_messages(nodes, initial, config(tmp_path / "plain")))
    weights = {int(m.metadata.src_node_id): int(m.content["metrics"]["num-examples"]) for m in plain}
    total = sum(weights.values())
    exact = {k: sum(m.content["arrays"][k].numpy().astype(np.float64) * weights[int(m.metadata.src_node_id)] for m in plain) / total
             for k in initial}

    outcome = secure_train_round(
        InProcessGrid(contexts()), _messages(nodes, initial, config(tmp_path / "secure")), server_round=1,
        expected=initial, settings=run.secure_agg, timeout=60,
    )
    assert not outcome.errors
    moved = max(float(np.abs(outcome.aggregate[k].numpy() - initial[k].numpy()).max()) for k in initial)
    assert moved > 1e-3, "training changed the adapter"
    for name in initial:
        assert np.abs(outcome.aggregate[name].numpy() - exact[name]).max() <= outcome.error_bound + 1e-6, name
    assert {m.content.config_records["site"]["name"] for m in outcome.updates} == {"site-0", "site-1", "site-2"}


def test_a_site_above_the_max_weight_refuses_before_training_so_spends_no_budget(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.model import adapter_state, build_model
    from fedtune.common.sitedata import load_config_table, run_labels

    run = from_dict({"model": {"base_model": str(tiny_model_dir), "max_length": 32}, "federation": {"sites": 3, "rounds": 2}})
    labels = run_labels(run.data, load_config_table(run.data))
    initial = ArrayRecord(adapter_state(build_model(run.model, run.lora, len(labels), seed=run.seed).model))
    nodes = [1, 2, 3]
    contexts = {n: Context(run_id=7, node_id=n, node_config={"partition-id": n - 1, "num-partitions": 3}, state=RecordDict(),
                           run_config=run.to_flat()) for n in nodes}
    config = {"server-round": 1, "num-rounds": 2, "labels": labels, "run-dir": str(tmp_path / "run")}
    grid = InProcessGrid(contexts)

    with pytest.raises(SecureAggregationError, match="secure-agg:max-weight"):
        secure_train_round(grid, _messages(nodes, initial, config), server_round=1, expected=initial,
                           settings=SecureAggConfig(enabled=True, max_weight=10), timeout=60)
    charges = [charge for path in (tmp_path / "run").rglob("privacy-ledger.json") for charge in PrivacyLedger(path.parent).charges()]
    assert charges == [], "no site was charged for a round it refused"
    refused = [m for m in grid.replies if m.has_error()]
    assert refused and all(_code(m) is RefusalCode.SECURE_AGG_MAX_WEIGHT for m in refused)
