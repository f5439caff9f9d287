"""What leaves a site: read from the real reply of the real ClientApp to a real Flower message.

The coordinator here is the attacker: it picks every run setting and every message field. Each
test sends what a curious or malicious coordinator would, and inspects what comes back and what
the site's ledger recorded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedtune.client.app import build_client_app
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.policy import SitePolicy
from fedtune.common.config import from_dict
from fedtune.common.messages import EVALUATE_REPLY_KEYS, TRAIN_REPLY_KEYS, EvaluateReply, RoundInstructions, TrainReply
from fedtune.common.model import adapter_state, base_model_id, build_model
from fedtune.common.sitedata import load_config_table, run_labels

from .deployment import write_site_data

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SITE = "hospital-a"
# The parameters of a train reply: what leaves a site whose policy releases no statistics.
PRIVACY_ONLY_KEYS = {"num-examples", "dp", "steps", "epsilon", "budget-epsilon", "delta", "noise-multiplier", "clip-norm", "sample-rate"}


def _setup(tiny_model_dir: Path, tmp_path: Path, **privacy: Any):  # type: ignore[no-untyped-def]
    run = from_dict(
        {
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "federation": {"sites": 2, "rounds": 2},
            "privacy": {"target_epsilon": 8.0, **privacy},
            "train": {"batch_size": 32, "local_epochs": 1.0},
            "out": str(tmp_path / "run"),
        }
    )
    labels = run_labels(run.data, load_config_table(run.data))
    initial = ArrayRecord(adapter_state(build_model(run.model, run.lora, len(labels), seed=run.seed).model))
    instructions = RoundInstructions(server_round=1, num_rounds=2, labels=tuple(labels), run_dir=str(tmp_path / "run"),
                                     base_model_id=base_model_id(run.model))
    context = Context(
        run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config=run.to_flat()
    )
    return run, labels, initial, ConfigRecord(instructions.to_config()), context


def _send(app, message_type: str, initial: ArrayRecord, config: ConfigRecord, context: Context) -> Message:  # type: ignore[no-untyped-def]
    msg = Message(RecordDict({"arrays": initial, "config": config}), dst_node_id=1, message_type=message_type)
    return app(msg, context)


def _site_data(tmp_path: Path, rows: int = 200) -> Path:
    """A deployed site's own file: the first rows of the packaged demo data."""
    return write_site_data(tmp_path / "site-data.csv", slice(0, rows))


def _deployed(tiny_model_dir: Path, tmp_path: Path, run_flat: dict[str, Any], *, budget: float = 8.0, **policy: Any) -> Context:
    """A deployed site's context: its node_config is what `fedtune site start` writes from site.toml."""
    node_config: dict[str, Any] = {
        "site-name": SITE, "data-path": str(_site_data(tmp_path)), "state-dir": str(tmp_path / "state"),
        "budget-epsilon": budget, "delta": 1e-5, "text-column": "text", "label-column": "label",
        "base-model": str(tiny_model_dir), "val-fraction": 0.1,
        **SitePolicy(**policy).to_node_config(),
    }
    return Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config={**run_flat, "simulation": False})


def _charges(tmp_path: Path) -> list[Any]:
    return PrivacyLedger(tmp_path / "state").charges()


def test_train_reply_carries_only_adapter_arrays_declared_metrics_and_site_name(tiny_model_dir: Path, tmp_path: Path) -> None:
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
    assert set(metrics.keys()) <= TRAIN_REPLY_KEYS
    assert all(isinstance(v, (int, float)) for v in metrics.values()), "metrics must be scalars, never lists"
    parsed = TrainReply.from_metrics("site-0", metrics)
    assert parsed.weight > 0 and 0 < parsed.privacy.epsilon <= 8.0
    site = content["site"]
    assert isinstance(site, ConfigRecord) and dict(site) == {"name": "site-0"}


def test_deployed_default_policy_releases_no_statistic_computed_from_private_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Default policy: the adapter and the privacy parameters, nothing else, even when validation is asked."""
    run, _, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    config["validate-first"] = True
    context = _deployed(tiny_model_dir, tmp_path, run.to_flat())

    reply = _send(build_client_app(), MessageType.TRAIN, initial, config, context)

    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == PRIVACY_ONLY_KEYS, "no loss, accuracy, clipped fraction or timing may leave"
    # The record count leaves only at two significant digits (180 training rows here: exact anyway),
    # and q = B / n is rounded too.
    assert metrics["sample-rate"] == pytest.approx(float(f"{32 / 180:.2g}"))
    assert [c.kind for c in _charges(tmp_path)] == ["dp-sgd"], "nothing but the training round was charged"


def test_deployed_default_policy_refuses_evaluate_messages(tiny_model_dir: Path, tmp_path: Path) -> None:
    run, _, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    reply = _send(build_client_app(), MessageType.EVALUATE, initial, config, _deployed(tiny_model_dir, tmp_path, run.to_flat()))
    assert reply.has_error()
    assert reply.error.reason == f"policy:statistics site={SITE}"
    assert _charges(tmp_path) == []


def test_dp_statistics_noise_matches_the_ledger_charge(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With statistics = 'dp', every evaluate spends budget, and the released figures carry the noise charged."""
    z_s, releases = 4.0, 40
    run, _, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    context = _deployed(tiny_model_dir, tmp_path, run.to_flat(), budget=1e6, statistics="dp", statistics_noise_multiplier=z_s)
    app = build_client_app()

    replies = [_send(app, MessageType.EVALUATE, initial, config, context) for _ in range(releases)]

    assert not any(r.has_error() for r in replies), replies[0].error
    assert all(set(r.content["metrics"].keys()) <= EVALUATE_REPLY_KEYS for r in replies)
    stats = [EvaluateReply.from_metrics(SITE, r.content["metrics"]).validation for r in replies]
    charges = _charges(tmp_path)
    assert len(charges) == releases and {c.kind for c in charges} == {"statistics"}
    assert {(c.noise_multiplier, c.sample_rate, c.steps) for c in charges} == {(z_s, 1.0, 1)}
    # The Gaussian mechanism on (correct, count, loss_sum / L): L2 sensitivity sqrt(3), so the std
    # on each coordinate is z_s * sqrt(3) for the z_s the ledger charged.
    expected_std = charges[0].noise_multiplier * math.sqrt(3)
    assert all(s.noise_std == pytest.approx(expected_std) and s.mode == "dp" for s in stats)
    # The released count (20 validation rows + noise) spreads with that std. For 40 draws,
    # the sample std lies within [0.70, 1.30] x sigma except with probability < 1e-3 (chi-square, 39 dof).
    counts = np.array([s.examples for s in stats])
    assert 0.70 * expected_std < counts.std(ddof=1) < 1.30 * expected_std
    assert abs(counts.mean() - 20) < 4 * expected_std / math.sqrt(releases)
    # Each release is charged to the validation records only: the epsilon grows with every one.
    epsilons = [s.epsilon for s in stats]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]


@pytest.mark.parametrize(
    ("attack", "run_settings", "policy", "code"),
    [
        ("raise the epsilon", {"privacy.target_epsilon": 50.0}, {}, "policy:max-epsilon"),
        ("noise below the site minimum", {"privacy.noise_multiplier": 0.3}, {"min_noise_multiplier": 0.5}, "policy:min-noise"),
        ("shrink the validation split", {"data.val_fraction": 0.01}, {}, "policy:val-fraction"),
        ("batch covers the whole split", {"train.batch_size": 10_000, "train.local_epochs": 0.5}, {"max_sample_rate": 0.5},
         "policy:max-sample-rate"),
        ("huge clip norm", {"privacy.clip_norm": 1e6}, {}, "policy:max-clip-norm"),
        ("drop secure aggregation", {}, {"require_secure_agg": True}, "policy:require-secure-agg"),
        ("train without DP", {"privacy.enabled": False}, {}, "policy:require-dp"),
    ],
)
def test_a_run_asking_more_than_the_site_policy_is_refused_before_training(
    tiny_model_dir: Path, tmp_path: Path, attack: str, run_settings: dict[str, Any], policy: dict[str, Any], code: str
) -> None:
    run, _, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    context = _deployed(tiny_model_dir, tmp_path, {**run.to_flat(), **run_settings}, **policy)

    reply = _send(build_client_app(), MessageType.TRAIN, initial, config, context)

    assert reply.has_error(), attack
    assert reply.error.reason == f"{code} site={SITE}", "a refusal is a code and the site's name, nothing else"
    assert _charges(tmp_path) == [], "the ledger is unchanged: nothing was charged, nothing trained"


def test_a_label_mismatch_refusal_carries_no_label_row_count_or_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    run, labels, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    config["labels"] = labels[:-1] + ["not-a-label"]
    context = _deployed(tiny_model_dir, tmp_path, run.to_flat())

    reply = _send(build_client_app(), MessageType.TRAIN, initial, config, context)

    assert reply.has_error()
    assert reply.error.reason == f"labels-mismatch site={SITE}"
    assert _charges(tmp_path) == []


def test_a_crash_inside_the_site_leaves_as_a_code_without_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    run, _, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    broken = ArrayRecord(dict(list(initial.items())[1:]))  # a malformed global adapter
    reply = _send(build_client_app(), MessageType.TRAIN, broken, config, _deployed(tiny_model_dir, tmp_path, run.to_flat()))
    assert reply.has_error()
    assert reply.error.reason == f"bad-request site={SITE}"


def test_a_simulated_round_past_budget_is_refused_before_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A fixed noise multiplier far too small for the budget: the very first round exceeds it.
    _, _, initial, config, context = _setup(tiny_model_dir, tmp_path, noise_multiplier=0.3, target_epsilon=0.5)
    reply = _send(build_client_app(), MessageType.TRAIN, initial, config, context)
    assert reply.has_error()
    assert reply.error.reason == "budget-exhausted site=site-0"
    ledger = PrivacyLedger(tmp_path / "run" / "sites" / "site-0")
    assert [c for c in ledger.charges() if c.kind == "dp-sgd"] == [], "a refused round must not be charged"


def test_deployed_site_trains_without_dp_only_when_its_operator_allows_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    run, _, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    flat = {**run.to_flat(), "privacy.enabled": False}
    allowed = _send(build_client_app(), MessageType.TRAIN, initial, config, _deployed(tiny_model_dir, tmp_path, flat, require_dp=False))
    assert not allowed.has_error(), allowed.error
    assert allowed.content["metrics"]["dp"] == 0


def test_clear_statistics_are_exact_and_measured_on_the_received_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Opt-in clear statistics: the validation a separate evaluate gives, in the train reply, before training."""
    run, _, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    context = _deployed(tiny_model_dir, tmp_path, run.to_flat(), statistics="clear")
    evaluated = EvaluateReply.from_metrics(SITE, _send(build_client_app(), MessageType.EVALUATE, initial, config, context).content["metrics"])
    config["validate-first"] = True
    trained = TrainReply.from_metrics(SITE, _send(build_client_app(), MessageType.TRAIN, initial, config, context).content["metrics"])

    assert trained.validation is not None and trained.training is not None
    assert trained.validation.mode == evaluated.validation.mode == "clear"
    assert trained.validation.examples == evaluated.validation.examples == 20
    for key in ("loss", "accuracy", "macro_f1"):
        assert getattr(trained.validation, key) == pytest.approx(getattr(evaluated.validation, key), abs=1e-6)
    assert [c.kind for c in _charges(tmp_path)] == ["dp-sgd"], "clear statistics are not charged: the report says so instead"


def test_deployed_site_loads_its_own_base_model_and_refuses_a_different_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.common.tiny import make_tiny_bert

    run, _, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    # The coordinator names a folder the site does not have: the site uses the one in its own site.toml.
    flat = {**run.to_flat(), "model.base_model": str(tmp_path / "coordinator-only-folder")}
    ok = _send(build_client_app(), MessageType.TRAIN, initial, config, _deployed(tiny_model_dir, tmp_path, flat))
    assert not ok.has_error(), ok.error

    other = make_tiny_bert(tmp_path / "other-model", hidden_size=48)
    context = _deployed(tiny_model_dir, tmp_path, flat)
    context.node_config["base-model"] = str(other)
    refused = _send(build_client_app(), MessageType.TRAIN, initial, config, context)
    assert refused.has_error()
    assert refused.error.reason == f"model-mismatch site={SITE}"


def test_with_published_labels_the_answer_depends_on_the_site_config_not_its_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The run's labels fit this site's data, but not the label set it published: refused all the same."""
    import json

    run, labels, initial, config, _ = _setup(tiny_model_dir, tmp_path)
    context = _deployed(tiny_model_dir, tmp_path, run.to_flat())
    context.node_config["labels"] = json.dumps([*labels, "dermatology"])  # published; no row has it

    refused = _send(build_client_app(), MessageType.TRAIN, initial, config, context)
    config["labels"] = [*labels, "dermatology"]
    six_labels = ArrayRecord(adapter_state(build_model(run.model, run.lora, len(labels) + 1, seed=run.seed).model))
    accepted = _send(build_client_app(), MessageType.TRAIN, six_labels, config, context)

    assert refused.has_error() and refused.error.reason == f"labels-mismatch site={SITE}"
    assert not accepted.has_error(), accepted.error
