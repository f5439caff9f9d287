"""Sites that crash, hang or refuse, through Flower's simulation engine and through the real ClientApp.

The simulated runs inject faults with ``--fail-site`` (``client/faults.py``); the coordinator sees
what a real fault looks like: Flower's error reply for a crash, no reply by the deadline for a
hang, a refusal code. They run Flower's engine (marked slow, like tests/integration/test_simulation.py).
The deployed-site tests call the real ClientApp with a deployed node config, as a SuperNode does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune.common.config import from_dict

pytestmark = pytest.mark.usefixtures("flower_task_identity")

# A round's deadline: well above a normal round (3 tiny sites on 2 quiet cores: 1-10 s, the engine's
# start-up excluded by the coordinator's warm-up; over 20 s when other jobs load the machine), and the
# hang round waits it out once, so it costs its length in test time.
ROUND_TIMEOUT = 45.0


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def faulty_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 sites, min_sites 2, 3 rounds: site-1 crashes in round 2 and site-2 hangs in round 3."""
    from fedtune.simulations.simulate import run_simulation

    run = from_dict(
        {
            "model": {"base_model": str(tiny_model_dir), "max_length": 16},
            # Short rounds: the deadline must hold a normal round with room to spare, even on a busy machine.
            "train": {"local_epochs": 0.5, "physical_batch_size": 64},
            "federation": {"sites": 3, "rounds": 3, "min_sites": 2, "round_timeout": ROUND_TIMEOUT},
            "privacy": {"target_epsilon": 8.0},
            "faults": {"fail_sites": ["site-1@2:crash", "site-2@3:hang"]},
            "out": str(tmp_path_factory.mktemp("faults") / "run"),
        }
    )
    return run_simulation(run)


@pytest.mark.slow  # Flower's simulation engine (Ray): about a minute
def test_the_run_completes_and_names_each_missing_site_with_its_reason(faulty_run: Path) -> None:
    lines = _metrics(faulty_run)

    assert [x["round"] for x in lines] == [1, 2, 3]
    assert lines[0]["sites_missing"] == [] and lines[0]["sites_replied"] == 3
    (crash,) = lines[1]["sites_missing"]
    assert crash["site"] == "site-1" and crash["reason"] == "crash", crash
    # Flower's own error message for a ClientApp that raised, with the exception's text.
    assert "site-1 crashes in round 2" in crash["detail"], crash
    assert lines[1]["sites_replied"] == 2
    assert [r["site"] for r in lines[1]["sites_rejected"]] == ["site-1"]
    assert lines[2]["sites_missing"] == [{"site": "site-2", "reason": "timeout"}]
    assert lines[2]["sites_replied"] == 2 and lines[2]["sites_rejected"] == []
    assert lines[2]["seconds"] >= ROUND_TIMEOUT, "the hang round closed at its deadline"
    assert set(lines[2]["epsilon_by_site"]) == {"site-0", "site-1"}, "a site that missed round 2 is asked again in round 3"


@pytest.mark.slow  # Flower's simulation engine (Ray): about a minute
def test_the_summary_is_complete_and_lists_the_missed_rounds(faulty_run: Path) -> None:
    summary = json.loads((faulty_run / "summary.json").read_text())

    assert [s["site"] for s in summary["sites"]] == ["site-0", "site-1", "site-2"]
    assert summary["missed_rounds"] == {"site-1": [{"round": 2, "reason": "crash"}], "site-2": [{"round": 3, "reason": "timeout"}]}
    assert summary["validation"]["round"] == 3
    for name in ("adapter/adapter_model.safetensors", "checkpoints/round-3/adapter_model.safetensors", "report.png", "privacy.json"):
        assert (faulty_run / name).exists(), name


@pytest.mark.slow  # Flower's simulation engine (Ray): about a minute
def test_a_site_that_crashed_after_its_charge_reports_that_round_as_spent(faulty_run: Path) -> None:
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.accounting import epsilon

    site = {s["site"]: s for s in json.loads((faulty_run / "summary.json").read_text())["sites"]}["site-1"]
    charges = [c for c in PrivacyLedger(faulty_run / "sites" / "site-1").charges() if c.kind == "dp-sgd"]

    assert [c.round for c in charges] == [1, 2, 3], "the crash came after the round-2 charge"
    # Noise was calibrated to reach the target after 3 rounds: only with round 2 counted is it reached.
    assert site["training_epsilon"] == pytest.approx(8.0, rel=0.01)
    without_round_2 = epsilon([c.segment for c in charges if c.round != 2], delta=site["delta"])
    assert without_round_2 < 0.9 * site["training_epsilon"]


@pytest.mark.slow  # Flower's simulation engine (Ray): about a minute
def test_too_few_sites_fail_the_round_by_name_and_the_command_exits_non_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "simulate", "--base-model", str(tiny_model_dir), "--max-length", "32", "--sites", "2", "--min-sites", "2",
        "--rounds", "2", "--fail-site", "site-0@2:refuse", "--fail-site", "site-1@2", "--out", str(out),
    ])

    assert result.exit_code != 0
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "round 2: 0 of 2 sampled sites sent a usable update (site-0: refused injected, site-1: crash)" in text, text
    assert "federation.min_sites is 2" in text and "after round 1's checkpoint" in text
    assert f"fedtune simulate --resume {out.resolve()}" in text
    assert [x["round"] for x in _metrics(out)] == [1], "the failed round left no line"
    assert (out / "checkpoints" / "round-1" / "complete.json").is_file()
    assert not (out / "summary.json").exists(), "no summary for a run that did not finish"


# -- the deployed handler path ---------------------------------------------------------------------


def _train_message(tiny_model_dir: Path, tmp_path: Path, faults: list[str], *, simulation: bool) -> tuple[Message, dict[str, Any]]:
    from fedtune.common.messages import RoundInstructions
    from fedtune.common.model import adapter_state, base_model_id, build_model
    from fedtune.common.sitedata import load_config_table, run_labels

    run = from_dict({
        "model": {"base_model": str(tiny_model_dir), "max_length": 32},
        "federation": {"sites": 2, "rounds": 2, "round_timeout": 600.0},
        "faults": {"fail_sites": faults},
        "simulation": True,  # valid only in a simulation: a coordinator can still send it to a deployed site
        "out": str(tmp_path / "run"),
    })
    labels = run_labels(run.data, load_config_table(run.data))
    initial = ArrayRecord(adapter_state(build_model(run.model, run.lora, len(labels), seed=run.seed).model))
    instructions = RoundInstructions(server_round=1, num_rounds=2, labels=tuple(labels), base_model_id=base_model_id(run.model))
    message = Message(RecordDict({"arrays": initial, "config": ConfigRecord(instructions.to_config())}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
    return message, {**run.to_flat(), "simulation": simulation}


def _deployed_context(tiny_model_dir: Path, tmp_path: Path, run_config: dict[str, Any]) -> Context:
    from fedtune.client.policy import SitePolicy

    from .deployment import write_site_data

    node_config = {
        "site-name": "hospital-a", "data-path": str(write_site_data(tmp_path / "site.csv", slice(0, 200))),
        "state-dir": str(tmp_path / "state"), "budget-epsilon": 8.0, "delta": 1e-5, "base-model": str(tiny_model_dir),
        **SitePolicy().to_node_config(),
    }
    return Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


@pytest.mark.parametrize("simulation", [True, False], ids=["claims-simulation", "deployed-run"])
def test_a_deployed_site_refuses_a_run_that_carries_a_fault_plan(tiny_model_dir: Path, tmp_path: Path, simulation: bool) -> None:
    """Whatever the run config says, a site without Flower's partition-id never crashes, hangs or refuses on command."""
    from fedtune.client.app import build_client_app
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.messages import REFUSAL_ERROR_CODE, Refusal

    message, run_config = _train_message(tiny_model_dir, tmp_path, ["site-0@1:crash", "site-1@1:refuse"], simulation=simulation)

    reply = build_client_app()(message, _deployed_context(tiny_model_dir, tmp_path, run_config))

    assert reply.has_error() and reply.error.code == REFUSAL_ERROR_CODE, reply.error
    refusal = Refusal.parse(reply.error.reason)
    assert refusal is not None and refusal.site == "hospital-a"
    # A run claiming to be a simulation reaches the fault check; an honest deployed one fails the config's own check.
    assert refusal.code.value == ("bad-request" if simulation else "site-config")
    assert PrivacyLedger(tmp_path / "state").charges() == [], "refused before anything was charged"


def test_a_deployed_site_refuses_the_warm_up_query_and_a_simulated_one_says_only_its_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The query message exists for the simulation's warm-up; a coordinator sending it to a real site learns nothing."""
    from fedtune.client.app import build_client_app
    from fedtune.common.messages import REFUSAL_ERROR_CODE, Refusal

    _, run_config = _train_message(tiny_model_dir, tmp_path, [], simulation=False)
    query = Message(RecordDict({"config": ConfigRecord({"data-path": "/etc/passwd"})}), dst_node_id=1, message_type=MessageType.QUERY)

    deployed = build_client_app()(query, _deployed_context(tiny_model_dir, tmp_path, run_config))

    assert deployed.has_error() and deployed.error.code == REFUSAL_ERROR_CODE, deployed.error
    refusal = Refusal.parse(deployed.error.reason)
    assert refusal is not None and refusal.code.value == "bad-request" and refusal.site == "hospital-a"

    simulated_context = Context(run_id=9, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                                run_config=run_config)
    simulated = build_client_app()(query, simulated_context)

    assert not simulated.has_error()
    assert not simulated.content.array_records and not simulated.content.metric_records
    assert {k: dict(v) for k, v in simulated.content.config_records.items()} == {"site": {"name": "site-1"}}
