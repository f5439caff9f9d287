"""What leaves a site: read from the real reply of the real ClientApp to a real Flower message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedtune.client.app import build_client_app
from fedtune.client.ledger import PrivacyLedger
from fedtune.common.config import from_dict
from fedtune.common.model import adapter_state, build_model
from fedtune.common.sitedata import load_config_table, run_labels


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _setup(tiny_model_dir: Path, tmp_path: Path, **privacy):  # type: ignore[no-untyped-def]
    run = from_dict(
        {
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "federation": {"sites": 2, "rounds": 2},
            "privacy": {"target_epsilon": 8.0, **privacy},
            "train": {"batch_size": 32},
            "out": str(tmp_path / "run"),
        }
    )
    labels = run_labels(run.data, load_config_table(run.data))
    initial = ArrayRecord(adapter_state(build_model(run.model, run.lora, len(labels), seed=run.seed).model))
    config = ConfigRecord({"server-round": 1, "num-rounds": 2, "labels": labels, "run-dir": str(tmp_path / "run")})
    context = Context(
        run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config=run.to_flat()
    )
    return run, labels, initial, config, context


def _send(app, message_type: str, initial: ArrayRecord, config: ConfigRecord, context: Context) -> Message:  # type: ignore[no-untyped-def]
    msg = Message(RecordDict({"arrays": initial, "config": config}), dst_node_id=1, message_type=message_type)
    return app(msg, context)


def test_train_reply_carries_only_adapter_arrays_scalar_metrics_and_site_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    run, labels, initial, config, context = _setup(tiny_model_dir, tmp_path)
    app = build_client_app()

    reply = _send(app, MessageType.TRAIN, initial, config, context)

    assert not reply.has_error(), reply.error
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    arrays = content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    # Exactly the adapter's tensors, by name and shape: LoRA A/B and the head, nothing of the base model.
    assert {k: tuple(v.shape) for k, v in arrays.items()} == {k: tuple(v.shape) for k, v in initial.items()}
    assert all(("lora_A" in k or "lora_B" in k or "classifier" in k) for k in arrays.keys())
    for name, arr in arrays.items():
        assert arr.numpy().dtype == np.float32, name
    metrics = content["metrics"]
    assert isinstance(metrics, MetricRecord)
    assert all(isinstance(v, (int, float)) for v in metrics.values()), "metrics must be scalars, never lists"
    assert metrics["num-examples"] > 0 and 0 < metrics["epsilon"] <= 8.0
    site = content["site"]
    assert isinstance(site, ConfigRecord) and dict(site) == {"name": "site-0"}
    # No text or token ids anywhere: the only strings that leave are the site's name.
    texts = set(load_config_table(run.data).texts)
    assert not any(isinstance(v, str) and v in texts for v in site.values())


def test_evaluate_reply_carries_only_scalar_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, _, initial, config, context = _setup(tiny_model_dir, tmp_path)
    reply = _send(build_client_app(), MessageType.EVALUATE, initial, config, context)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"metrics", "site"}
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == {"num-examples", "loss", "accuracy", "macro-f1"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_round_past_budget_is_refused_with_typed_error_before_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A fixed noise multiplier far too small for the budget: the very first round exceeds it.
    _, _, initial, config, context = _setup(tiny_model_dir, tmp_path, noise_multiplier=0.3, target_epsilon=0.5)
    reply = _send(build_client_app(), MessageType.TRAIN, initial, config, context)
    assert reply.has_error()
    assert reply.error.reason.startswith("PrivacyBudgetError:")
    assert "budget 0.5" in reply.error.reason
    ledger = PrivacyLedger(tmp_path / "run" / "sites" / "site-0")
    assert all(not entry.get("charges") for entry in ledger.summary().values()), "a refused round must not be charged"


def test_malformed_global_adapter_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, _, initial, config, context = _setup(tiny_model_dir, tmp_path)
    broken = ArrayRecord(dict(list(initial.items())[1:]))
    reply = _send(build_client_app(), MessageType.TRAIN, broken, config, context)
    assert reply.has_error()
    assert "UpdateError" in reply.error.reason and "missing" in reply.error.reason


def _deployed_context(tiny_model_dir: Path, tmp_path: Path, run_flat: dict, *, allow_no_dp: str) -> Context:  # type: ignore[type-arg]
    from fedtune.common.sitedata import demo_data_path

    node_config = {
        "site-name": "hospital-a", "data-path": str(demo_data_path()), "state-dir": str(tmp_path / "state"),
        "budget-epsilon": 8.0, "delta": 1e-5, "text-column": "text", "label-column": "label", "allow-no-dp": allow_no_dp,
        "base-model": str(tiny_model_dir),
    }
    return Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_flat)


def test_deployed_site_refuses_a_run_without_dp_unless_its_operator_allows_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    run, labels, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    flat = {**run.to_flat(), "privacy.enabled": False, "simulation": False}

    refused = _send(build_client_app(), MessageType.TRAIN, initial, config, _deployed_context(tiny_model_dir, tmp_path, flat, allow_no_dp="false"))
    allowed = _send(build_client_app(), MessageType.TRAIN, initial, config, _deployed_context(tiny_model_dir, tmp_path, flat, allow_no_dp="true"))

    assert refused.has_error() and "trains only with differential privacy" in refused.error.reason
    assert not allowed.has_error(), allowed.error
    assert allowed.content["metrics"]["dp"] == 0


def test_train_message_validates_the_received_adapter_before_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One message per round: the validation a separate evaluate message would give, in the train reply."""
    _, _, initial, config, context = _setup(tiny_model_dir, tmp_path)
    evaluated = _send(build_client_app(), MessageType.EVALUATE, initial, config, context).content["metrics"]
    config["validate-first"] = True
    trained = _send(build_client_app(), MessageType.TRAIN, initial, config, context).content["metrics"]

    assert trained["val-examples"] == evaluated["num-examples"]
    for key in ("loss", "accuracy", "macro-f1"):
        assert trained[f"val-{key}"] == pytest.approx(evaluated[key], abs=1e-6), "measured on the adapter received, not the one trained"


def test_deployed_site_loads_its_own_base_model_and_refuses_a_different_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.common.model import base_model_id
    from fedtune.common.tiny import make_tiny_bert

    run, _, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    # The coordinator names a folder the site does not have: the site uses the one in its own site.toml.
    flat = {**run.to_flat(), "model.base_model": str(tmp_path / "coordinator-only-folder"), "simulation": False}
    config["base-model-id"] = base_model_id(run.model)
    ok = _send(build_client_app(), MessageType.TRAIN, initial, config, _deployed_context(tiny_model_dir, tmp_path, flat, allow_no_dp="false"))
    assert not ok.has_error(), ok.error

    other = make_tiny_bert(tmp_path / "other-model", hidden_size=48)
    context = _deployed_context(tiny_model_dir, tmp_path, flat, allow_no_dp="false")
    context.node_config["base-model"] = str(other)
    refused = _send(build_client_app(), MessageType.TRAIN, initial, config, context)
    assert refused.has_error()
    assert "is not the run's" in refused.error.reason and str(other) in refused.error.reason
