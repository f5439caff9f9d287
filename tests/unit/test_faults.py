"""Fault plans (--fail-site) and how the coordinator names sites that sent no usable update."""

from __future__ import annotations

from collections.abc import Callable
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from fedtune.common.config import FAULT_MODES, SiteFault, from_dict, parse_site_fault
from fedtune.common.errors import ConfigError, PolicyRefusal, RoundFailedError

# -- the --fail-site syntax ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("site-1@2", SiteFault(site="site-1", round=2, mode="crash")),
        ("site-0@1:crash", SiteFault(site="site-0", round=1, mode="crash")),
        ("site-2@3:hang", SiteFault(site="site-2", round=3, mode="hang")),
        (" site-10@12:refuse ", SiteFault(site="site-10", round=12, mode="refuse")),
    ],
)
def test_a_fail_site_entry_names_the_site_the_round_and_the_mode(text: str, expected: SiteFault) -> None:
    assert parse_site_fault(text) == expected
    assert parse_site_fault(str(expected)) == expected, "str() round-trips"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("site-1", "the syntax is NAME@ROUND[:crash|hang|refuse]"),
        ("@2", "the syntax is"),
        ("site-1@", "the syntax is"),
        ("site-1@0", "ROUND must be an integer >= 1, got '0'"),
        ("site-1@two", "ROUND must be an integer >= 1, got 'two'"),
        ("site-1@-1", "ROUND must be an integer >= 1"),
        ("site-1@2:explode", "the mode must be one of ['crash', 'hang', 'refuse'], got 'explode'"),
    ],
)
def test_a_malformed_entry_is_refused_naming_where_the_value_and_the_syntax(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_site_fault(text, where="--fail-site")
    message = str(info.value)
    assert message.startswith(f"--fail-site {text!r}") and says in message, message
    assert "NAME@ROUND[:crash|hang|refuse]" in message


def test_the_config_refuses_unknown_sites_late_rounds_and_two_faults_for_one_site_and_round() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"federation": {"sites": 3, "rounds": 4},
                   "faults": {"fail_sites": ["site-3@1", "site-0@5:hang", "site-1@2", "site-1@2:refuse"]}})
    problems = info.value.problems
    assert any("'site-3' is not a simulated site" in p and "site-0..site-2" in p for p in problems), problems
    assert any("round 5 is after the last round (federation.rounds = 4)" in p for p in problems), problems
    assert any("names site-1 in round 2 twice" in p for p in problems), problems
    assert len(problems) == 3


def test_a_fault_plan_is_refused_in_a_deployed_run_config() -> None:
    with pytest.raises(ConfigError, match="applies to simulations only"):
        from_dict({"simulation": False, "faults": {"fail_sites": ["site-0@1"]}})


def test_the_fault_plan_travels_in_flowers_flat_run_config() -> None:
    from fedtune.common.config import from_flat

    run = from_dict({"federation": {"rounds": 3}, "faults": {"fail_sites": ["site-1@2:crash", "site-2@3:hang"]}})

    assert from_flat(run.to_flat()).faults.plan == run.faults.plan
    assert [f.mode for f in run.faults.plan] == ["crash", "hang"] and set(FAULT_MODES) == {"crash", "hang", "refuse"}


def test_the_fail_site_flag_reports_a_bad_value_by_the_flags_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from fedtune.cli import main

    result = CliRunner().invoke(main, ["simulate", "--fail-site", "site-1@x", "--out", str(tmp_path / "run")])

    assert result.exit_code == 2
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "--fail-site 'site-1@x': ROUND must be an integer >= 1" in text, text
    assert not (tmp_path / "run").exists(), "refused before anything started"


# -- injection at the site -------------------------------------------------------------------------


def _run(faults: list[str], **federation: object):  # type: ignore[no-untyped-def]
    return from_dict({"federation": {"sites": 3, "rounds": 3, **federation}, "faults": {"fail_sites": faults}})


def test_a_simulated_site_finds_its_own_fault_for_its_train_message_of_that_round_only() -> None:
    from fedtune.client.faults import site_fault

    run = _run(["site-1@2:crash", "site-2@2:hang"])
    node = {"partition-id": 1, "num-partitions": 3}

    assert site_fault(run, node, server_round=2, kind="train") == SiteFault(site="site-1", round=2, mode="crash")
    assert site_fault(run, node, server_round=1, kind="train") is None
    assert site_fault(run, node, server_round=2, kind="evaluate") is None, "the final validation is not a train message"
    assert site_fault(run, {"partition-id": 0}, server_round=2, kind="train") is None


def test_a_deployed_site_refuses_any_fault_plan_and_ignores_an_empty_one() -> None:
    from fedtune.client.faults import site_fault

    deployed = {"site-name": "hospital-a", "data-path": "x.csv", "state-dir": "state", "budget-epsilon": 8.0}

    with pytest.raises(PolicyRefusal) as info:
        site_fault(_run(["site-0@1"]), deployed, server_round=1, kind="train")
    assert info.value.code == "bad-request"
    assert site_fault(_run([]), deployed, server_round=1, kind="train") is None


def test_refuse_raises_the_injected_code_and_crash_raises_past_the_site_s_own_refusals() -> None:
    from fedtune.client.faults import InjectedCrash, after_training, before_training

    run = _run([])
    with pytest.raises(PolicyRefusal) as info:
        before_training(SiteFault(site="site-0", round=1, mode="refuse"), run)
    assert info.value.code == "injected"
    with pytest.raises(InjectedCrash, match="site-0 crashes in round 1"):
        after_training(SiteFault(site="site-0", round=1, mode="crash"))
    before_training(SiteFault(site="site-0", round=1, mode="crash"), run)  # a crash waits for the charge
    after_training(None)
    after_training(SiteFault(site="site-0", round=1, mode="refuse"))


def test_hang_sleeps_past_the_deadline_by_a_bounded_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.client import faults

    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)

    faults.before_training(SiteFault(site="site-2", round=3, mode="hang"), _run([], round_timeout=12.5))

    assert slept == [12.5 + faults.HANG_GRACE_SECONDS] and 0 < faults.HANG_GRACE_SECONDS <= 10


# -- the coordinator's view --------------------------------------------------------------------------


class ScriptedGrid:
    """A stand-in for the SuperLink: each node answers a pushed message with its scripted reply, or never."""

    def __init__(self, answers: dict[int, Callable[[Message], Message] | None]) -> None:
        self.answers = answers
        self.pushed: dict[str, Message] = {}

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            self.pushed[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        out = []
        for mid in list(message_ids):
            msg = self.pushed[mid]
            answer = self.answers.get(msg.metadata.dst_node_id)
            if answer is not None:
                out.append(answer(msg))
        return out

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return list(self.answers)


def _train(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)


def _named(name: str) -> Callable[[Message], Message]:
    return lambda msg: Message(RecordDict({"site": ConfigRecord({"name": name})}), reply_to=msg)


def _flower_error(code: int, reason: str) -> Callable[[Message], Message]:
    return lambda msg: Message(Error(code=code, reason=reason), reply_to=msg)


def _node_unavailable(msg: Message) -> Message:
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")


@pytest.mark.usefixtures("flower_task_identity")
def test_missing_sites_are_named_from_earlier_replies_with_their_reasons() -> None:
    from flwr.common.constant import ErrorCode

    from fedtune.common.messages import REFUSAL_ERROR_CODE, Refusal, RefusalCode
    from fedtune.server.exchange import NodeNames, WatchedGrid, send_and_receive
    from fedtune.server.rounds import missing_sites
    from fedtune.server.screening import rejection_of_error

    names = NodeNames()
    first = ScriptedGrid({11: _named("site-a"), 12: _named("site-b"), 13: _named("site-c"), 14: _named("site-d"), 15: _named("site-e")})
    watched = WatchedGrid(first)
    names.learn(send_and_receive(watched, [_train(n) for n in first.answers], timeout=1.0), watched)

    # Next round: a crash, a node the SuperLink reports offline, a refusal, one that never answers, one fine.
    second = ScriptedGrid({
        11: _flower_error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "<class 'RuntimeError'>:<'boom'>"),
        12: _node_unavailable,
        13: _flower_error(REFUSAL_ERROR_CODE, Refusal(site="site-c", code=RefusalCode.BUDGET_EXHAUSTED).reason()),
        14: None,
        15: _named("site-e"),
    })
    watched = WatchedGrid(second)
    replies = send_and_receive(watched, [_train(n) for n in second.answers], timeout=0.3)
    names.learn(replies, watched)
    rejected = [rejection_of_error(m, names.of(m, watched)) for m in replies if m.has_error()]

    missing = sorted(missing_sites(rejected, watched, names), key=lambda m: m["site"])

    assert missing == [
        {"site": "site-a", "reason": "crash", "detail": "<class 'RuntimeError'>:<'boom'>"},
        {"site": "site-b", "reason": "offline", "detail": missing[1]["detail"]},
        {"site": "site-c", "reason": "refused", "code": "budget-exhausted"},
        {"site": "site-d", "reason": "timeout"},
    ]
    assert "heartbeat" in missing[1]["detail"]
    assert names.name(99) == "node 99", "a node never heard from is named by its id"


def test_too_few_usable_updates_fail_the_round_naming_each_site_and_how_to_resume() -> None:
    from fedtune.server.rounds import FailureRule

    rule = FailureRule(min_sites=2, resume_command="fedtune run --resume /runs/r1")
    missing = [{"site": "hospital-b", "reason": "timeout"}, {"site": "hospital-c", "reason": "refused", "code": "budget-exhausted"}]

    rule.check(4, usable=2, sampled=3, missing=missing[:1])  # enough: no error
    with pytest.raises(RoundFailedError) as info:
        rule.check(4, usable=1, sampled=3, missing=missing)

    assert str(info.value) == (
        "round 4: 1 of 3 sampled sites sent a usable update (hospital-b: timeout, hospital-c: refused budget-exhausted); "
        "federation.min_sites is 2. The run stopped after round 3's checkpoint; continue it with "
        "`fedtune run --resume /runs/r1` once the sites are back."
    )
    assert info.value.missing == ["hospital-b: timeout", "hospital-c: refused budget-exhausted"]
    with pytest.raises(RoundFailedError, match="before its first checkpoint"):
        rule.check(1, usable=0, sampled=3, missing=[])
    FailureRule(min_sites=0).check(1, usable=0, sampled=3, missing=[])  # client-level DP: a round without sites still releases


def test_a_round_waits_a_bounded_time_for_enough_connected_sites() -> None:
    from fedtune.server.rounds import FailureRule, wait_for_sites

    grid = ScriptedGrid({11: None})

    with pytest.raises(RoundFailedError, match=r"round 3: 1 site\(s\) connected to the coordinator within federation.round_timeout \(0.2s\); federation.min_sites is 2"):
        wait_for_sites(grid, needed=2, timeout=0.2, server_round=3, rule=FailureRule(min_sites=2))  # type: ignore[arg-type]
    wait_for_sites(grid, needed=1, timeout=0.2, server_round=3, rule=FailureRule(min_sites=1))  # type: ignore[arg-type]


def test_a_simulation_whose_engine_runs_another_number_of_sites_fails_at_once_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    # `flwr run .` on Flower's default federation runs 2 SuperNodes; fedtune's default is 3 sites.
    from fedtune.server import rounds
    from fedtune.server.exchange import NodeNames

    monkeypatch.setattr(rounds, "NODES_REGISTER_SECONDS", 0.3)
    for nodes in ({11: _named("site-0"), 12: _named("site-1")}, {n: _named(f"site-{n}") for n in range(4)}):
        with pytest.raises(ConfigError, match=rf"runs {len(nodes)} SuperNodes but federation.sites is 3.*federation.sites={len(nodes)}"):
            rounds.warm_up_sites(ScriptedGrid(nodes), NodeNames(), expected=3, timeout=5.0)  # type: ignore[arg-type]


def test_the_round_line_and_the_summary_name_the_missing_sites() -> None:
    from fedtune.server.rounds import _round_line, missed_rounds

    line = {"round": 3, "sites_replied": 2, "sites_sampled": 3, "sites_missing": [{"site": "hospital-c", "reason": "timeout"}],
            "train_loss": None, "validated_round": 2, "accuracy": 0.5, "test_accuracy": None, "max_epsilon": 1.0,
            "bytes_up": 1000, "bytes_down": 1000, "seconds": 1.0}
    lines = [{"round": 1, "sites_missing": []}, {"round": 2, "sites_missing": [{"site": "b", "reason": "refused", "code": "injected"}]},
             {"round": 3, "sites_missing": [{"site": "a", "reason": "crash", "detail": "x"}, {"site": "b", "reason": "timeout"}]}]

    assert "sites 2/3 (hospital-c: timeout)" in _round_line(line, 5)
    assert missed_rounds(lines) == {"a": [{"round": 3, "reason": "crash"}],
                                    "b": [{"round": 2, "reason": "refused", "code": "injected"}, {"round": 3, "reason": "timeout"}]}
