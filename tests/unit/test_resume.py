"""Resuming after a coordinator crash: metrics cut back, config changes, checkpoint choice, optimiser and
client-level DP state, the sites' noise re-planned, and durable run directories."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app import MessageType
from flwr.serverapp.strategy import FedAvg

from fedtune.client.ledger import PrivacyLedger
from fedtune.common.accounting import Segment
from fedtune.common.config import RunConfig, dump_toml, from_dict
from fedtune.common.errors import ConfigError, PrivacyBudgetError
from fedtune.common.io import check_writable
from fedtune.common.messages import RefusalCode, RoundInstructions
from fedtune.server.app import make_strategy
from fedtune.server.client_dp import ClientLevelDP
from fedtune.server.records import RunRecorder
from fedtune.server.resume import (
    MANIFEST_FILE,
    REQUEST_FILE,
    RoundState,
    RunIdentity,
    begin_run,
    check_changes,
    checkpoint_arrays,
    checkpoint_files,
    config_diff,
    cut_metrics,
    latest_checkpoint,
    parse_allow_change,
    request_resume,
    restore_strategy,
    write_identity,
    write_manifest,
)
from fedtune.server.rounds import run_rounds
from fedtune.server.server_opt import ServerOptimizer
from tests.unit.test_ledger import ROWS, _dp_accounting_epsilon

DELTA = 1e-5


def _line(r: int) -> dict[str, Any]:
    return {"round": r, "loss": 1.0 / r, "sites_replied": 2}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines).encode()


# --- metrics.jsonl cut back to the checkpoint ------------------------------------------------------


def test_lines_after_the_checkpoint_and_a_torn_last_line_are_dropped(tmp_path: Path) -> None:
    # Prepare: rounds 1-3 whole, round 4 whole (its checkpoint torn), half of round 5's append
    (tmp_path / "metrics.jsonl").write_bytes(_jsonl([_line(r) for r in range(1, 5)]) + b'{"round": 5, "lo')

    # Execute: resume from the checkpoint of round 3
    cut = cut_metrics(tmp_path, upto=3, last_line=_line(3))

    # Assert: exactly rounds 1..3, once each, on disk too
    assert [x["round"] for x in cut.lines] == [1, 2, 3] and cut.dropped == 2
    assert (tmp_path / "metrics.jsonl").read_bytes() == _jsonl([_line(1), _line(2), _line(3)])


def test_a_torn_last_line_with_its_newline_is_dropped_and_the_checkpoint_restores_a_lost_line(tmp_path: Path) -> None:
    # Prepare: the crash came after checkpoint 3 but before its line was appended; a garbled line ends the file
    (tmp_path / "metrics.jsonl").write_bytes(_jsonl([_line(1), _line(2)]) + b"\x00\x00\x00\n")

    # Execute
    cut = cut_metrics(tmp_path, upto=3, last_line=_line(3))

    # Assert
    assert [x["round"] for x in cut.lines] == [1, 2, 3] and cut.dropped == 1
    assert (tmp_path / "metrics.jsonl").read_bytes() == _jsonl([_line(1), _line(2), _line(3)])


def test_damage_that_is_not_a_torn_last_line_is_refused_not_papered_over(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_jsonl([_line(1)]) + b"garbage\n" + _jsonl([_line(2)]))
    with pytest.raises(ConfigError, match="line 2 is not a round's JSON line"):
        cut_metrics(tmp_path, upto=2, last_line=_line(2))
    path.write_bytes(_jsonl([_line(1), _line(3)]))
    with pytest.raises(ConfigError, match=r"lacks the lines of rounds \[2\]"):
        cut_metrics(tmp_path, upto=3, last_line=_line(3))


def test_no_checkpoint_means_an_empty_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_bytes(b'{"round": 1')
    assert cut_metrics(tmp_path, upto=0, last_line=None).lines == []
    assert (tmp_path / "metrics.jsonl").read_bytes() == b""


# --- config changes --------------------------------------------------------------------------------


def test_config_diff_names_each_key_with_its_old_and_new_value() -> None:
    old = from_dict({"federation": {"rounds": 4}, "out": "/a"})
    new = from_dict({"federation": {"rounds": 6, "round_timeout": 60.0}, "out": "/b"})
    assert [str(c) for c in config_diff(old, new)] == ["federation.round_timeout: 900.0 -> 60.0", "federation.rounds: 4 -> 6"]


def test_a_changed_config_is_refused_unless_allow_change_names_it(tmp_path: Path) -> None:
    changes = config_diff(from_dict({"federation": {"rounds": 4}}), from_dict({"federation": {"rounds": 6, "round_timeout": 60.0}}))
    with pytest.raises(ConfigError) as err:
        check_changes(changes, ("federation.rounds",), run_dir=tmp_path)
    assert "federation.round_timeout: 900.0 -> 60.0" in str(err.value) and "--allow-change federation.round_timeout" in str(err.value)
    assert "federation.rounds" not in str(err.value).split("differs")[1]
    check_changes(changes, ("federation.rounds", "federation.round_timeout"), run_dir=tmp_path)  # no error


def test_settings_the_checkpoint_depends_on_can_never_change() -> None:
    with pytest.raises(ConfigError) as err:
        parse_allow_change(["federation.rounds,lora.rank", "seed", "federation.nonsense"])
    text = str(err.value)
    assert "lora.rank can never change" in text and "seed can never change" in text
    assert "unknown setting 'federation.nonsense'" in text
    assert parse_allow_change(["federation.rounds, federation.round_timeout", "federation.rounds"]) == (
        "federation.rounds", "federation.round_timeout")
    changes = config_diff(from_dict({}), from_dict({"lora": {"rank": 4}}))
    with pytest.raises(ConfigError, match=r"lora.rank can never change when a run resumes \(8 -> 4\)"):
        check_changes(changes, ("lora.rank",), run_dir=Path("/r"))


def _run_dir(tmp_path: Path, run: RunConfig, *, run_id: str = "42") -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_toml(run, run_dir / "config.toml")
    write_identity(run_dir, RunIdentity(run_id=run_id, created=0.0, fedtune_version="test"))
    return run_dir


def test_cli_resume_refuses_a_changed_flag_naming_key_old_and_new_values(tmp_path: Path) -> None:
    # Prepare: a simulated run's directory, as the coordinator left it before round 1
    run_dir = _run_dir(tmp_path, from_dict({"federation": {"rounds": 4}, "out": str(tmp_path / "run")}))

    # Execute: resume with more rounds, first without, then with --allow-change
    refused = CliRunner().invoke(__import__("fedtune.cli", fromlist=["main"]).main, ["simulate", "--resume", str(run_dir), "--rounds", "6"])

    # Assert: one line naming the key, the old and new value and the flag; no request left behind
    assert refused.exit_code == 2, refused.output
    assert "federation.rounds: 4 -> 6" in refused.output and "--allow-change federation.rounds" in refused.output
    assert not (run_dir / REQUEST_FILE).exists()
    deployed = CliRunner().invoke(__import__("fedtune.cli", fromlist=["main"]).main, ["run", "--resume", str(run_dir), "--insecure"])
    assert deployed.exit_code == 2 and "fedtune simulate --resume" in deployed.output


def test_the_coordinator_continues_a_used_directory_only_on_a_matching_request(tmp_path: Path) -> None:
    # Prepare
    stored = from_dict({"federation": {"rounds": 4}, "out": str(tmp_path / "run")})
    run_dir = _run_dir(tmp_path, stored)
    longer = from_dict({"federation": {"rounds": 6}}, base=stored)

    # Execute / Assert: no request, then a request for another config, then the right one
    with pytest.raises(ConfigError, match="already holds run 42; continue it with `fedtune simulate --resume"):
        begin_run(run_dir, stored, flower_run_id=7)
    request_resume(run_dir, stored, ())
    with pytest.raises(ConfigError, match="was made for another config"):
        begin_run(run_dir, longer, flower_run_id=7)
    request_resume(run_dir, longer, ("federation.rounds",))
    identity, point = begin_run(run_dir, longer, flower_run_id=7)

    # Assert: the first identity kept, the resume recorded, the request consumed, round 1 next (nothing checkpointed)
    assert identity.run_id == "42" and point is not None and point.next_round == 1
    assert identity.resumes[-1]["changes"] == [{"key": "federation.rounds", "old": 4, "new": 6}]
    assert json.loads((run_dir / "run.json").read_text())["resumes"][-1]["flower_run_id"] == "7"
    assert not (run_dir / REQUEST_FILE).exists()


# --- checkpoints ---------------------------------------------------------------------------------------


def _fedadam() -> RunConfig:
    return from_dict({"federation": {"min_sites": 2, "server_opt": "adam", "server_lr": 0.01}})


def _reply(arrays: dict[str, np.ndarray], *, node: int, n: int) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)
    record = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": n})}), reply_to=request)


class _Nodes:
    """Just enough of a Grid for sampling: the node ids (a stand-in for Flower's grid, not under test)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _round(strategy: Any, r: int, arrays: ArrayRecord, updates: list[dict[str, np.ndarray]]) -> ArrayRecord:
    strategy.configure_train(r, arrays, ConfigRecord(), _Nodes(len(updates)))
    new, _ = strategy.aggregate_train(r, [_reply(u, node=i + 1, n=10 * (i + 1)) for i, u in enumerate(updates)])
    return new


def _updates(x: dict[str, np.ndarray], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in x.items()} for _ in range(3)]


def _checkpoint(run_dir: Path, model: Any, r: int, arrays: ArrayRecord, strategy: Any, run_id: str = "42") -> Path:
    from fedtune.common.model import load_adapter_state, save_adapter
    from fedtune.server.resume import strategy_parts

    optimizer, client_dp = strategy_parts(strategy)
    state = RoundState(round=r, run_id=run_id, labels=("a", "b"), line=_line(r), sites={}, bytes_up=0, bytes_down=0, seconds=0.0,
                       optimizer_steps=optimizer.state.steps if optimizer else None,
                       client_dp=client_dp.state().to_json() if client_dp else None)
    folder = run_dir / "checkpoints" / f"round-{r}"
    load_adapter_state(model, arrays.to_torch_state_dict())
    save_adapter(model, folder, metadata={"round": r}, extra_files=checkpoint_files(state, optimizer.state if optimizer else None))
    write_manifest(folder, server_round=r, run_id=run_id)
    return folder


@pytest.mark.usefixtures("flower_task_identity")
def test_a_resumed_fedadam_run_takes_the_step_of_the_run_that_never_stopped(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.common.model import adapter_state
    from tests.unit.lora_models import lora_model

    # Prepare: FedAdam over FedAvg, two rounds in memory, then the checkpoint of round 2 written as run_server writes it
    model = lora_model(tiny_model_dir, 2)
    x0 = {k: v.numpy() for k, v in adapter_state(model).items()}
    going = make_strategy(_fedadam())
    assert isinstance(going, ServerOptimizer)
    arrays = ArrayRecord(adapter_state(model))
    for r in (1, 2):
        arrays = _round(going, r, arrays, _updates(x0, r))
    _checkpoint(tmp_path, model, 2, arrays, going)

    # Execute: a new coordinator process reads the checkpoint into a fresh strategy; both take round 3
    checkpoint = latest_checkpoint(tmp_path, run_id="42")
    assert checkpoint is not None and checkpoint.round == 2
    resumed_arrays = checkpoint_arrays(checkpoint, adapter_state(model))
    resumed = make_strategy(_fedadam())
    restore_strategy(resumed, checkpoint, {k: v.numpy() for k, v in resumed_arrays.items()})
    fresh = make_strategy(_fedadam())  # what a resume without the optimiser's state would do
    third = _updates(x0, 3)
    expected = _round(going, 3, arrays, third)
    got = _round(resumed, 3, resumed_arrays, third)
    naive = _round(fresh, 3, resumed_arrays, third)

    # Assert: the adapter read back bit for bit, the same step bit for bit; a state-less resume steps elsewhere
    for k in arrays.keys():
        np.testing.assert_array_equal(resumed_arrays[k].numpy(), arrays[k].numpy(), err_msg=k)
        np.testing.assert_array_equal(got[k].numpy(), expected[k].numpy(), err_msg=k)
    assert resumed.state.steps == going.state.steps == 3
    assert max(float(np.abs(naive[k].numpy() - expected[k].numpy()).max()) for k in arrays.keys()) > 1e-4


@pytest.mark.usefixtures("flower_task_identity")
def test_seeded_client_level_dp_continues_with_the_same_sampling_noise_and_round_count(tmp_path: Path) -> None:
    # Prepare: q = 0.5 of 20 sites, seeded (simulation); two rounds, state saved through JSON as a checkpoint holds it
    x = {"a.lora_A.weight": np.zeros((2, 6), np.float32), "a.lora_B.weight": np.zeros((6, 2), np.float32)}

    def strategy() -> ClientLevelDP:
        return ClientLevelDP(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, sites=20, seed=5)

    going = strategy()
    arrays = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in x.items()})
    for r in (1, 2):
        arrays = _round(going, r, arrays, _updates(x, r))
    saved = json.loads(json.dumps(going.state().to_json()))

    # Execute
    from fedtune.server.client_dp import ClientDPState

    resumed = strategy()
    resumed.load_state(ClientDPState.from_json(saved))
    sampled_going = [m.metadata.dst_node_id for m in going.configure_train(3, arrays, ConfigRecord(), _Nodes(20))]
    sampled_resumed = [m.metadata.dst_node_id for m in resumed.configure_train(3, arrays, ConfigRecord(), _Nodes(20))]
    a, _ = going.aggregate_train(3, [])
    b, _ = resumed.aggregate_train(3, [])

    # Assert: same sites, same noise, three releases counted; a fresh strategy would sample from the start
    assert sampled_going == sampled_resumed
    assert [m.metadata.dst_node_id for m in strategy().configure_train(1, arrays, ConfigRecord(), _Nodes(20))] != sampled_going
    for k in x:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    assert going.state().rounds == resumed.state().rounds == 3
    with pytest.raises(ConfigError, match="seeded"):
        ClientLevelDP(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, sites=20).load_state(ClientDPState.from_json(saved))


@pytest.mark.usefixtures("flower_task_identity")
def test_a_torn_or_damaged_checkpoint_is_skipped_for_the_one_before(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.common.model import adapter_state
    from tests.unit.lora_models import lora_model

    # Prepare: complete checkpoints of rounds 1-3
    model = lora_model(tiny_model_dir, 2)
    strategy = make_strategy(_fedadam())
    arrays = ArrayRecord(adapter_state(model))
    x0 = {k: v.numpy() for k, v in arrays.items()}
    folders = []
    for r in (1, 2, 3):
        arrays = _round(strategy, r, arrays, _updates(x0, r))
        folders.append(_checkpoint(tmp_path, model, r, arrays, strategy))
    assert latest_checkpoint(tmp_path, run_id="42").round == 3  # type: ignore[union-attr]

    # Execute / Assert: round 3 without its manifest (the crash came before it), then round 2 with a file changed after it
    (folders[2] / MANIFEST_FILE).unlink()
    assert latest_checkpoint(tmp_path, run_id="42").round == 2  # type: ignore[union-attr]
    weights = folders[1] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path, run_id="42").round == 1  # type: ignore[union-attr]
    # a checkpoint of another run is never this run's
    assert latest_checkpoint(tmp_path, run_id="43") is None
    # a half-written manifest
    (folders[0] / MANIFEST_FILE).write_text('{"format": 1, "round": 1, "ru')
    assert latest_checkpoint(tmp_path, run_id="42") is None


@pytest.mark.usefixtures("flower_task_identity")
def test_the_round_loop_checkpoints_a_round_before_its_line_reaches_metrics(tmp_path: Path) -> None:
    # Prepare: client-level DP that samples no site (noise is still released), resuming at round 3 of 4
    x = {"a.lora_A.weight": np.zeros((2, 6), np.float32), "a.lora_B.weight": np.zeros((6, 2), np.float32)}

    class _Never(random.Random):
        def random(self) -> float:
            return 1.0 - 2.0**-53

    dp = ClientLevelDP(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, sites=2, seed=1, sampling_rng=_Never())
    (tmp_path / "metrics.jsonl").write_bytes(_jsonl([_line(1), _line(2)]))
    seen: list[tuple[int, list[int]]] = []

    def checkpoint(r: int, _arrays: ArrayRecord) -> None:
        seen.append((r, [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]))

    # Execute
    run_rounds(
        _Nodes(2),  # type: ignore[arg-type]
        dp, initial=ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in x.items()}), num_rounds=4, start_round=3,
        instructions=RoundInstructions(server_round=1, num_rounds=4, labels=("a", "b")), timeout=1.0,
        recorder=RunRecorder(tmp_path), checkpoint=checkpoint, validate=False, echo=lambda _line: None,
    )

    # Assert: each checkpoint came before its line; the file then holds rounds 1-4 once each
    assert seen == [(3, [1, 2]), (4, [1, 2, 3])]
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# --- the sites: noise re-planned for the rounds left ------------------------------------------------------


def _plan(ledger: PrivacyLedger, r: int, *, rounds: int = 4, target: float = 1.5) -> float:
    return ledger.plan_noise(ROWS, run="run-1", sample_rate=0.01, steps_per_round=100, rounds=rounds, target_epsilon=target,
                             budget_epsilon=8.0, delta=DELTA, server_round=r).noise_multiplier


def _charge(ledger: PrivacyLedger, r: int, z: float) -> float:
    return ledger.charge(ROWS, run="run-1", round=r, segment=Segment(sample_rate=0.01, noise_multiplier=z, steps=100), clip_norm=1.0,
                         delta=DELTA, budget_epsilon=8.0)


def test_a_site_charged_for_a_lost_round_replans_the_rounds_left_and_stays_within_its_target(tmp_path: Path) -> None:
    # Prepare: 4 planned rounds; rounds 1-3 trained and charged, then the coordinator crashed before checkpointing round 3
    ledger = PrivacyLedger(tmp_path)
    z = _plan(ledger, 1)
    for r in (1, 2, 3):
        assert _plan(ledger, r) == z  # the plan covers the run as long as nothing is lost
        _charge(ledger, r, z)

    # Execute: the resumed coordinator (checkpoint of round 2) asks for round 3 again, then round 4
    z3 = _plan(PrivacyLedger(tmp_path), 3)
    _charge(ledger, 3, z3)
    z4 = _plan(ledger, 4)
    spent = _charge(ledger, 4, z4)

    # Assert: more noise for the two rounds left; Google's dp-accounting (independent of the code under test) puts
    # the five charges within the target, and on it; the four-round z kept would have gone past it
    history = [Segment(0.01, z, 100)] * 3 + [Segment(0.01, z3, 100)] * 2
    assert z4 == z3 > z >= 0.9
    assert _dp_accounting_epsilon(history, DELTA) <= 1.5 * (1 + 1e-6)
    assert _dp_accounting_epsilon(history, DELTA) == pytest.approx(1.5, rel=5e-3)
    assert spent <= 1.5 + 1e-9
    assert _dp_accounting_epsilon([Segment(0.01, z, 100)] * 5, DELTA) > 1.5 * 1.02
    plan = ledger.plan("run-1")
    assert plan is not None and plan.charged_before == 3 and plan.rounds == 2
    print(f"z planned for 4 rounds {z:.4f}; re-planned for the 2 left after 3 charges {z3:.4f}; "
          f"dp-accounting epsilon {_dp_accounting_epsilon(history, DELTA):.4f} (without re-planning "
          f"{_dp_accounting_epsilon([Segment(0.01, z, 100)] * 5, DELTA):.4f}); target 1.5")


def test_a_crash_before_the_site_was_charged_changes_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    z = _plan(ledger, 1)
    for r in (1, 2):
        _charge(ledger, r, z)
    assert _plan(ledger, 3) == z  # round 3 asked again: this run charged 2, and 2 rounds are left
    assert ledger.plan("run-1").charged_before == 0  # type: ignore[union-attr]


def test_more_rounds_allowed_on_resume_are_planned_within_the_target(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    z = _plan(ledger, 1)
    for r in (1, 2, 3, 4):
        _charge(ledger, r, z)
    z5 = _plan(ledger, 5, rounds=6, target=2.0)  # --rounds 6 --epsilon 2 --allow-change federation.rounds,privacy.target_epsilon
    _charge(ledger, 5, z5)
    _charge(ledger, 6, _plan(ledger, 6, rounds=6, target=2.0))
    assert _dp_accounting_epsilon([Segment(0.01, z, 100)] * 4 + [Segment(0.01, z5, 100)] * 2, DELTA) <= 2.0 * (1 + 1e-6)


def test_a_site_with_too_little_left_refuses_with_the_budget_code(tmp_path: Path) -> None:
    # Prepare: the four rounds charged, and round 4 once more at the same z (a run with a fixed z, or an older
    # fedtune that did not re-plan): the records are past the run's target, below the site's budget
    ledger = PrivacyLedger(tmp_path)
    z = _plan(ledger, 1)
    for r in (1, 2, 3, 4, 4):
        _charge(ledger, r, z)

    # Execute / Assert: round 4 asked again is refused before training, with the code a site sends
    with pytest.raises(PrivacyBudgetError) as err:
        _plan(ledger, 4)
    assert err.value.code == RefusalCode.BUDGET_EXHAUSTED.value
    assert len(ledger.charges()) == 5


def test_a_sliver_left_is_spent_with_more_noise_never_past_the_target(tmp_path: Path) -> None:
    # All four rounds charged, round 4 asked again: what is left is tiny, and z grows to fit it
    ledger = PrivacyLedger(tmp_path)
    z = _plan(ledger, 1)
    for r in (1, 2, 3, 4):
        _charge(ledger, r, z)
    z_again = _plan(ledger, 4)
    assert z_again > 5 * z
    assert _dp_accounting_epsilon([Segment(0.01, z, 100)] * 4 + [Segment(0.01, z_again, 100)], DELTA) <= 1.5 * (1 + 1e-6)


# --- durable run directories -----------------------------------------------------------------------------


def test_an_unwritable_run_directory_is_a_config_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"run directory \\(--out\\) {blocker}/run is not writable"):
        check_writable(blocker / "run", what="run directory (--out)")
    result = CliRunner().invoke(__import__("fedtune.cli", fromlist=["main"]).main,
                                ["simulate", "--rounds", "1", "--out", str(blocker / "run")])
    assert result.exit_code == 2 and f"{blocker}/run is not writable" in result.output and "Traceback" not in result.output


def test_a_run_directory_that_cannot_take_the_probe_is_refused(tmp_path: Path) -> None:
    # The operating system's own file-size limit stands in for a full disk: the write fails as it would (EFBIG
    # instead of ENOSPC), nothing in fedtune is replaced. SIGXFSZ is ignored so the write returns the error.
    script = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        from fedtune.common.errors import ConfigError
        from fedtune.common.io import check_writable
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            check_writable(Path({str(tmp_path / 'run')!r}), what="run directory (out)")
        except ConfigError as err:
            print("REFUSED", err)
        print("LEFT", sorted(p.name for p in Path({str(tmp_path / 'run')!r}).iterdir()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env={**os.environ})
    assert f"REFUSED run directory (out) {tmp_path / 'run'} is not writable" in out.stdout, out.stdout + out.stderr
    assert "LEFT []" in out.stdout  # the probe is removed


def test_a_resumed_run_keeps_the_initial_adapter_s_test_score_its_first_session_measured(tmp_path: Path) -> None:
    """The score goes into each checkpoint's fedtune.json as server/app.py writes it (a dict of TestScore, JSON),
    and a resume reads it back unchanged: its own arrays are the checkpoint's, no longer the initial adapter."""
    import dataclasses

    from fedtune.common.model import METADATA_FILE
    from fedtune.server.resume import INIT_TEST_KEY, Checkpoint, resumed_init_score
    from fedtune.server.rounds import TestScore

    measured = TestScore(accuracy=0.625, macro_f1=0.5, loss=0.875, examples=40, sampled=True)
    state = RoundState(round=1, run_id="r", labels=("a", "b"), line={}, sites={}, bytes_up=0, bytes_down=0, seconds=0.0)

    def checkpoint(meta: dict[str, Any] | str) -> Checkpoint:
        folder = tmp_path / f"round-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / METADATA_FILE).write_text(meta if isinstance(meta, str) else json.dumps(meta), encoding="utf-8")
        return Checkpoint(round=1, folder=folder, state=state)

    assert resumed_init_score(checkpoint({"labels": ["a"], INIT_TEST_KEY: dataclasses.asdict(measured)})) == measured
    assert resumed_init_score(checkpoint({"labels": ["a"]})) is None  # none measured, or written before it was recorded
    lm = TestScore(accuracy=None, macro_f1=None, loss=2.5, perplexity=12.182493960703473, examples=8)
    assert resumed_init_score(checkpoint({INIT_TEST_KEY: dataclasses.asdict(lm)})) == lm
    for bad in ({"accuracy": "0.6", "macro_f1": 0.5, "loss": 0.8}, {"accuracy": 0.6, "loss": 0.8}, [0.6]):
        with pytest.raises(ConfigError, match=rf"round-\d+/fedtune.json: {INIT_TEST_KEY} must be a test score"):
            resumed_init_score(checkpoint({INIT_TEST_KEY: bad}))
    with pytest.raises(ConfigError, match="is unreadable"):
        resumed_init_score(checkpoint("{"))


def test_a_resumed_run_reads_its_checkpoints_fedtune_json_once_for_the_initial_adapter_and_its_score(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import fedtune.common.io as io
    from fedtune.common.model import METADATA_FILE
    from fedtune.server.resume import INIT_TEST_KEY, Checkpoint, resumed_init_adapter, resumed_init_score
    from fedtune.server.rounds import TestScore

    digest = "sha256:" + "1" * 64
    measured = TestScore(accuracy=0.5, macro_f1=0.25, loss=1.5, examples=20)
    folder = tmp_path / "round-1"
    folder.mkdir()
    (folder / METADATA_FILE).write_text(json.dumps({
        "labels": ["a", "b"], "lineage": [{"run_id": "A", "adapter": "A/adapter", "digest": digest, "epsilon": 1.0}],
        "init_adapter": {"digest": digest, "earlier_labels": ["a"], "labels_added": ["b"]},
        INIT_TEST_KEY: dataclasses.asdict(measured)}), encoding="utf-8")
    state = RoundState(round=1, run_id="r", labels=("a", "b"), line={}, sites={}, bytes_up=0, bytes_down=0, seconds=0.0)
    checkpoint = Checkpoint(round=1, folder=folder, state=state)
    reads: list[Path] = []
    real = io.read_json_object

    def counted(path, where):  # type: ignore[no-untyped-def]  # a spy: the real reader, counted
        reads.append(Path(path))
        return real(path, where)

    monkeypatch.setattr(io, "read_json_object", counted)
    run = from_dict({"model": {"init_adapter": str(tmp_path / "A" / "adapter")}})

    init = resumed_init_adapter(checkpoint, run)
    score = resumed_init_score(checkpoint)

    assert init is not None and init.digest == digest and init.labels_added == ("b",) and score == measured
    assert reads == [folder / METADATA_FILE], "one read of the checkpoint's fedtune.json serves both"
