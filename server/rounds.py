"""The coordinator's round loop over a Flower Grid, around a swappable Flower strategy.

The strategy (FedAvg by default; any ``flwr.serverapp.strategy.Strategy``) samples sites and
aggregates; this loop adds what a regulated deployment needs around it: every update screened
before aggregation, a checkpoint and a metrics line after every round, per-site privacy kept
per site (never averaged), and the bytes that crossed the wire.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.common.config import SecureAggConfig
from fedtune.common.errors import ConfigError, RoundFailedError, UpdateError
from fedtune.common.messages import METRICS_RECORD, EvaluateReply, RoundInstructions, TrainReply, ValidationStats

from .exchange import NodeNames, WatchedGrid, send_and_receive
from .records import RunRecorder
from .screening import Rejection, arrays_nbytes, rejection_of_error, screen_train_replies, site_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestScore:
    accuracy: float | None  # None for a causal LM, which has a perplexity instead
    macro_f1: float | None
    loss: float
    perplexity: float | None = None
    examples: int | None = None  # held-out examples the figures come from
    sampled: bool = False  # True: a fixed sample of the held-out split (evaluation.sample), not all of it


@dataclass
class RoundTotals:
    bytes_up: int = 0
    bytes_down: int = 0
    # Federated validation of the final adapter (one evaluate exchange after the last round).
    final_validation: dict[str, Any] | None = None


@dataclass
class TrainExchange:
    """One round's training exchange, plain or secure."""

    arrays: ArrayRecord | None  # the new global adapter (None: keep the old one)
    updates: list[TrainReply]  # the parsed reply of every update used
    rejected: list[Rejection]
    bytes_up: int
    bytes_down: int
    strategy_metrics: dict | None = None  # type: ignore[type-arg]
    secure: dict | None = None  # type: ignore[type-arg]
    missing: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the round line's sites_missing


@dataclass(frozen=True, kw_only=True)
class FailureRule:
    """When a round fails (:class:`RoundFailedError`) and what the error tells the operator to do.

    ``min_sites``: fewer usable updates than this fail the round (0: never, as under client-level
    DP, which releases a noised adapter even for a round nobody took part in). ``resume_command``:
    how to continue the run, e.g. ``fedtune run --resume RUN_DIR``.
    """

    min_sites: int = 0
    resume_command: str = ""

    def check(self, server_round: int, *, usable: int, sampled: int, missing: list[dict[str, Any]], headline: str = "") -> None:
        if usable >= self.min_sites:
            return
        names = [describe_missing(m) for m in missing]
        stopped = f"after round {server_round - 1}'s checkpoint" if server_round > 1 else "before its first checkpoint"
        resume = f"; continue it with `{self.resume_command}` once the sites are back" if self.resume_command else ""
        raise RoundFailedError(
            f"round {server_round}: {headline or f'{usable} of {sampled} sampled sites sent a usable update'}"
            f"{' (' + ', '.join(names) + ')' if names else ''}; federation.min_sites is {self.min_sites}. "
            f"The run stopped {stopped}{resume}.",
            server_round=server_round, usable=usable, sampled=sampled, min_sites=self.min_sites, missing=names,
        )


def describe_missing(entry: dict[str, Any]) -> str:
    """'site-b: timeout', 'site-c: refused budget-exhausted', 'site-a: crash'."""
    return f"{entry['site']}: {entry['reason']}" + (f" {entry['code']}" if entry.get("code") else "")


def missing_sites(rejected: list[Rejection], grid: WatchedGrid, names: NodeNames) -> list[dict[str, Any]]:
    """Every sampled site without a usable update and why: its rejection's kind, or 'timeout' for no reply by the deadline."""
    out: list[dict[str, Any]] = []
    for r in rejected:
        entry: dict[str, Any] = {"site": r.site, "reason": r.kind}
        if r.code:
            entry["code"] = r.code
        elif r.reason != r.kind:
            entry["detail"] = r.reason.removeprefix(f"{r.kind}: ")
        out.append(entry)
    seen = {e["site"] for e in out}
    out += [{"site": names.name(node), "reason": "timeout"} for node in grid.unanswered() if names.name(node) not in seen]
    return out


def wait_for_sites(grid: Grid, *, needed: int, timeout: float, server_round: int, rule: FailureRule) -> None:
    """Wait up to ``timeout`` seconds for ``needed`` connected sites, else fail the round.

    Flower's strategies wait for their minimum of connected nodes without a bound: a site daemon
    that never comes back would hang the run instead of failing the round by name.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() >= deadline:
            rule.check(server_round, usable=connected, sampled=needed, missing=[],
                       headline=f"{connected} site(s) connected to the coordinator within federation.round_timeout ({timeout:g}s)")
            return
        logger.info("round %d: waiting for sites: %d connected, %d needed", server_round, connected, needed)
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _weighted(pairs: list[tuple[float | None, float]]) -> float | None:
    """Weighted mean of the (value, weight) pairs whose value is known."""
    known = [(v, max(w, 0.0)) for v, w in pairs if v is not None]
    total = sum(w for _, w in known)
    return sum(v * w for v, w in known) / total if total else None


def _validation_means(stats: list[ValidationStats]) -> dict[str, float | None]:
    """Example-weighted means of released validation statistics (noisy counts under DP, clamped at 0)."""
    return {
        "loss": _weighted([(v.loss, v.examples) for v in stats]),
        "accuracy": _weighted([(v.accuracy, v.examples) for v in stats]),
        "macro_f1": _weighted([(v.macro_f1, v.examples) for v in stats]),
    }


WARM_UP_SECONDS = 600.0
"""Bound on the wait for simulated sites to load their libraries before round 1."""
NODES_REGISTER_SECONDS = 15.0
"""Bound on the wait for the engine's SuperNodes to appear: it registers them all at its start."""


def warm_up_sites(grid: Grid, names: NodeNames, *, expected: int, timeout: float) -> None:
    """Simulation: check the engine runs ``expected`` sites, then wait until each has loaded its libraries.

    One query message per site, answered with its name once its ClientApp has imported torch,
    PEFT and Opacus: the engine starts its sites lazily, and that start-up (a minute on a busy
    machine) would otherwise count against round 1's deadline. Bounded by ``timeout``; a site
    that does not answer is simply asked again in round 1.
    """
    started = time.monotonic()
    # The engine registers all its SuperNodes at start; a short wait covers only the hand-over.
    while len(nodes := list(grid.get_node_ids())) < expected and time.monotonic() - started < NODES_REGISTER_SECONDS:
        time.sleep(0.2)
    if len(nodes) != expected:
        # Each simulated site takes the share `partition-id` of a `federation.sites`-way split: with
        # fewer SuperNodes some shares would silently go untrained, with more some would have none.
        raise ConfigError(
            f"the simulation engine runs {len(nodes)} SuperNodes but federation.sites is {expected}: make them equal "
            f"(with `flwr run`: --run-config \"federation.sites={len(nodes)}\", or set the federation's num-supernodes)."
        )
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    watched = WatchedGrid(grid)
    replies = send_and_receive(watched, messages, timeout=max(1.0, timeout - (time.monotonic() - started)))
    names.learn(replies, watched)
    ready = sum(not r.has_error() for r in replies)
    logger.info("%d of %d simulated sites ready in %.1fs", ready, len(messages), time.monotonic() - started)


def _plain_exchange(
    grid: Grid, strategy: Strategy, server_round: int, arrays: ArrayRecord, messages: list[Message], timeout: float, max_update_norm: float = 0.0,
    *, names: NodeNames | None = None, rule: FailureRule | None = None,
) -> TrainExchange:
    down = arrays_nbytes(arrays) * len(messages)
    names = names if names is not None else NodeNames()
    watched = WatchedGrid(grid)
    replies = send_and_receive(watched, messages, timeout=timeout) if messages else []
    names.learn(replies, watched)
    # Measured as received: screening pads a lower-rank reply to the global rank in the message.
    received = {id(m): arrays_nbytes(m.content.array_records["arrays"]) for m in replies
                if not m.has_error() and "arrays" in m.content.array_records}
    accepted, rejected = screen_train_replies(replies, arrays, max_update_norm=max_update_norm, name_of=lambda m: names.of(m, watched))
    missing = missing_sites(rejected, watched, names)
    # Before aggregation: a failed round changes no state a resume would have to undo.
    (rule or FailureRule()).check(server_round, usable=len(accepted), sampled=len(messages), missing=missing)
    if not accepted:
        logger.warning("round %d: no usable update (%d sites sampled)", server_round, len(messages))
    # Called even with no update: a DP strategy must still release a noised adapter, or an
    # unchanged one would reveal that no sampled site took part.
    new_arrays, strategy_metrics = strategy.aggregate_train(server_round, [m for m, _ in accepted])
    return TrainExchange(
        arrays=new_arrays,
        updates=[reply for _, reply in accepted],
        rejected=rejected,
        bytes_up=sum(received[id(m)] for m, _ in accepted),
        bytes_down=down,
        strategy_metrics=dict(strategy_metrics or {}),
        missing=missing,
    )


def _secure_exchange(
    grid: Grid, server_round: int, arrays: ArrayRecord, messages: list[Message], timeout: float, secure: SecureAggConfig,
    strategy: Strategy | None = None, *, names: NodeNames | None = None, rule: FailureRule | None = None,
) -> TrainExchange:
    from .secure_agg import SecureAggregationError, secure_train_round
    from .server_opt import ServerOptimizer

    names = names if names is not None else NodeNames()
    watched = WatchedGrid(grid)
    try:
        outcome = secure_train_round(watched, messages, server_round=server_round, expected=arrays, settings=secure, timeout=timeout)
    except SecureAggregationError as err:
        names.learn(watched.replies, watched)
        errors = [rejection_of_error(m, names.of(m, watched)) for m in watched.replies if m.has_error()]
        missing = [describe_missing(m) for m in missing_sites(errors, watched, names)]
        stopped = f"after round {server_round - 1}'s checkpoint" if server_round > 1 else "before its first checkpoint"
        resume = f"; continue it with `{rule.resume_command}` once the sites are back" if rule and rule.resume_command else ""
        raise SecureAggregationError(f"{err}. Sites without a reply: {', '.join(missing) or 'none'}. The run stopped {stopped}{resume}.") from None
    names.learn(watched.replies, watched)
    # The protocol's mean replaces the strategy's aggregation, so a server optimiser steps from it
    # here: it needs only the mean, which is all SecAgg+ shows the coordinator anyway.
    aggregate = strategy.apply(server_round, outcome.aggregate) if isinstance(strategy, ServerOptimizer) else outcome.aggregate
    updates, rejected = [], [rejection_of_error(m, names.of(m, watched)) for m in outcome.errors]
    for m in outcome.updates:
        try:
            updates.append(TrainReply.from_metrics(site_name(m), dict(m.content.config_records["fitres.metrics"])))
        except UpdateError as err:  # its masked vector is already in the sum: only its figures are dropped
            rejected.append(Rejection(site_name(m), f"metrics not recorded: {err}"))
    # Sites whose masked vector is not in the sum: an error at some stage, or no reply by a stage's deadline.
    in_sum = {watched.node_of(m) for m in outcome.updates}
    missing = [e for e in missing_sites(rejected, watched, names) if e["site"] not in {names.name(n) for n in in_sum}]
    (rule or FailureRule()).check(server_round, usable=len(outcome.updates), sampled=len(messages), missing=missing)
    return TrainExchange(
        arrays=aggregate,
        updates=updates,
        rejected=rejected,
        bytes_up=outcome.bytes_up,
        bytes_down=outcome.bytes_down,
        secure={
            "protocol": "SecAgg+",
            "sites_sampled": len(messages),
            "threshold": outcome.threshold,
            "quantization_range": outcome.quantization_range,
            "quantization_error_bound": outcome.error_bound,
        },
        missing=missing,
    )


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    *,
    initial: ArrayRecord,
    num_rounds: int,
    instructions: RoundInstructions,
    timeout: float,
    recorder: RunRecorder,
    checkpoint: Callable[[int, ArrayRecord], None],
    test_fn: Callable[[ArrayRecord, int], TestScore | None] | None = None,
    secure: SecureAggConfig | None = None,
    validate: bool = True,
    echo: Callable[[str], None] = print,
    max_update_norm: float = 0.0,
    start_round: int = 1,
    totals: RoundTotals | None = None,
    failure: FailureRule | None = None,
    warm_up: int = 0,
    epsilon_label: str = "max-epsilon",
) -> tuple[ArrayRecord, RoundTotals]:
    """Run rounds ``start_round``..``num_rounds``; returns the final global adapter and the bytes exchanged.

    A resumed run starts after its last complete checkpoint, with ``initial`` that checkpoint's
    adapter and ``totals`` its bytes so far. Each round's line is kept by the recorder, then the
    round is checkpointed, and only then is the line appended to metrics.jsonl and printed: nothing
    computed from a round's aggregate (its test score, its line) leaves the coordinator before the
    checkpoint that a resume would continue from, so a round lost to a crash released nothing.

    One message exchange per round: each sampled site first validates the global adapter it
    receives, then trains (``validate``). Round r's ``loss``/``accuracy``/``macro_f1`` are
    therefore the federated validation of the adapter after round r-1 (``validated_round``); one
    evaluate exchange after the last round validates the final adapter.

    With ``secure`` enabled, each training exchange runs as SecAgg+ and its unmasked mean replaces
    the strategy's aggregation (a weighted mean is all the protocol yields); a round the protocol
    cannot finish raises :class:`~fedtune.server.secure_agg.SecureAggregationError`.

    ``max_update_norm`` > 0 bounds each tensor group's update norm in screening (plain exchanges
    only: secure aggregation hides the updates, and `make_strategy` refuses the combination).

    Each exchange closes at ``timeout`` (``federation.round_timeout``) with the replies it has;
    the round's line names in ``sites_missing`` every sampled site without a usable update and
    why ('timeout', 'crash', 'refused' with its code, 'offline', 'rejected', 'error'). A site
    that missed a round is sampled again as usual. With ``failure`` (``min_sites`` > 0), a round
    with fewer usable updates, or fewer connected sites by ``timeout``, raises
    :class:`~fedtune.common.errors.RoundFailedError` before anything of it is aggregated,
    checkpointed or recorded: the run stops after the previous round's checkpoint.

    ``test_fn(arrays, server_round)`` scores the round's adapter on the coordinator's held-out split,
    or returns None for a round that ``evaluation.every`` leaves untested (``server/eval_schedule.py``).

    ``warm_up`` > 0 (simulation: the number of sites) first waits for the sites to load their
    libraries (:func:`warm_up_sites`), so that round 1's deadline does not include that start-up.
    """
    arrays = initial
    rule = failure or FailureRule()
    names = NodeNames()  # node id -> site name, from the replies that carry one
    if warm_up > 0:
        warm_up_sites(grid, names, expected=warm_up, timeout=max(timeout, WARM_UP_SECONDS))
    totals = totals if totals is not None else RoundTotals()
    train_config = dataclasses.replace(instructions, validate_first=validate).to_config()
    for server_round in range(start_round, num_rounds + 1):
        started = time.perf_counter()
        if rule.min_sites > 0:
            wait_for_sites(grid, needed=rule.min_sites, timeout=timeout, server_round=server_round, rule=rule)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid))
        if secure is not None and secure.enabled:
            exchange = _secure_exchange(grid, server_round, arrays, messages, timeout, secure, strategy, names=names, rule=rule)
        else:
            exchange = _plain_exchange(grid, strategy, server_round, arrays, messages, timeout, max_update_norm, names=names, rule=rule)
        if exchange.arrays is not None:
            arrays = exchange.arrays
        for reply in exchange.updates:
            recorder.site(reply.site).update(server_round, reply)

        score = test_fn(arrays, server_round) if test_fn else None  # None: a round the schedule does not test
        totals.bytes_up += exchange.bytes_up
        totals.bytes_down += exchange.bytes_down
        trained = exchange.updates
        # A site's guarantee is the max over all its records: trained ones and validation ones.
        epsilons = {r.site: recorder.site(r.site).epsilon for r in trained}
        validations = [r.validation for r in trained if r.validation is not None]
        means = _validation_means(validations)
        line = {
            "round": server_round,
            "sites_sampled": len(messages),
            "sites_replied": len(exchange.updates),
            "sites_rejected": [{"site": r.site, "reason": r.reason, "code": r.code} for r in exchange.rejected],
            # Every sampled site without a usable update, by name, and why ('timeout': no reply by the deadline).
            "sites_missing": exchange.missing,
            "train_loss": _weighted([(r.training.loss if r.training else None, r.weight) for r in trained]),
            "validated_round": server_round - 1 if validations else None,
            "loss": means["loss"],
            "accuracy": means["accuracy"],
            "macro_f1": means["macro_f1"],
            # What each site released besides its adapter ('dp': noised and charged; 'clear': its operator's opt-in).
            "statistics": {r.site: (r.validation.mode if r.validation else "none") + ("+training" if r.training else "") for r in trained},
            "test_accuracy": score.accuracy if score else None,
            "test_macro_f1": score.macro_f1 if score else None,
            "test_loss": score.loss if score else None,
            "test_perplexity": score.perplexity if score else None,
            "test_examples": score.examples if score else None,
            "test_sampled": score.sampled if score else None,
            "epsilon_by_site": epsilons,
            "max_epsilon": max(epsilons.values()) if epsilons else None,
            # Only the strategy's own figures: a mean of the sites' epsilons would mislead.
            "client_dp": {k: v for k, v in (exchange.strategy_metrics or {}).items() if str(k).startswith("client-dp-")} or None,
            # A robust rule's own count: sites it saw, updates it averaged, or that it refused the round.
            "robust": {k: v for k, v in (exchange.strategy_metrics or {}).items() if str(k).startswith("robust-")} or None,
            "secure_agg": exchange.secure,
            "bytes_up": exchange.bytes_up,
            "bytes_down": exchange.bytes_down,
            "seconds": round(time.perf_counter() - started, 3),
        }
        recorder.note_round(line)
        checkpoint(server_round, arrays)
        recorder.append_round(line)
        echo(_round_line(line, num_rounds, epsilon_label))
    if validate:
        totals.final_validation = _final_validation(grid, strategy, num_rounds, arrays, instructions, timeout, totals, recorder, names)
    return arrays, totals


def _final_validation(
    grid: Grid, strategy: Strategy, num_rounds: int, arrays: ArrayRecord, instructions: RoundInstructions, timeout: float,
    totals: RoundTotals, recorder: RunRecorder, names: NodeNames | None = None,
) -> dict[str, Any] | None:
    """The final adapter's federated validation: one evaluate exchange after the last round.

    Sites whose policy releases no statistics refuse it (``policy:statistics``); they are counted.
    Sites that did not answer by the deadline are named in ``sites_missing``.
    """
    config = dataclasses.replace(instructions, server_round=num_rounds).to_config()
    messages = list(strategy.configure_evaluate(num_rounds, arrays, ConfigRecord(config), grid))
    if not messages:
        return None
    totals.bytes_down += arrays_nbytes(arrays) * len(messages)
    results: list[ValidationStats] = []
    refused: list[dict[str, Any]] = []
    names = names if names is not None else NodeNames()
    watched = WatchedGrid(grid)
    replies = send_and_receive(watched, messages, timeout=timeout)
    names.learn(replies, watched)
    for m in replies:
        if m.has_error():
            r = rejection_of_error(m, names.of(m, watched))
            refused.append({"site": r.site, "reason": r.reason, "code": r.code})
            continue
        try:
            reply = EvaluateReply.from_metrics(site_name(m), m.content.metric_records[METRICS_RECORD])
        except (UpdateError, KeyError) as err:
            refused.append({"site": site_name(m), "reason": f"rejected reply: {err}", "code": None})
            continue
        recorder.site(reply.site).validated(reply.validation)
        results.append(reply.validation)
    missing = [{"site": names.name(node), "reason": "timeout"} for node in watched.unanswered()]
    return {"round": num_rounds, "sites": len(results), "sites_refused": refused, "sites_missing": missing, **_validation_means(results)}


def missed_rounds(lines: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each site's missed rounds from the round lines: ``{site: [{"round": r, "reason": ...}, ...]}``.

    A site that crashed or timed out may have been charged for that round (privacy is spent when
    noise is drawn) without any reply reporting it; its own ledger is the record.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        for m in line.get("sites_missing") or []:
            out.setdefault(m["site"], []).append({"round": line["round"], "reason": m["reason"], **({"code": m["code"]} if m.get("code") else {})})
    return dict(sorted(out.items()))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _round_line(line: dict, num_rounds: int, epsilon_label: str = "max-epsilon") -> str:  # type: ignore[type-arg]
    sample = f"(sample {line['test_examples']})" if line.get("test_sampled") else ""  # never mistaken for the full figure
    test = f"  test-accuracy{sample} {line['test_accuracy']:.3f}" if line["test_accuracy"] is not None else ""
    if line.get("test_perplexity") is not None:  # a causal LM
        test = f"  test-perplexity{sample} {line['test_perplexity']:.2f}"
    val = (f"  val-loss(round {_fmt(line['validated_round'], 'd')}) {_fmt(line['loss'], '.3f')}"
           if line["accuracy"] is None and line.get("loss") is not None else
           f"  val-accuracy(round {_fmt(line['validated_round'], 'd')}) {_fmt(line['accuracy'], '.3f')}")
    # Training loss exists only when a site's policy releases clear statistics.
    train = f"  train-loss {line['train_loss']:.4f}" if line["train_loss"] is not None else ""
    missing = ", ".join(describe_missing(m) for m in line.get("sites_missing") or [])
    return (
        f"round {line['round']}/{num_rounds}  sites {line['sites_replied']}/{line['sites_sampled']}"
        f"{' (' + missing + ')' if missing else ''}{train}"
        f"{val}{test}"
        f"  {epsilon_label} {_fmt(line['max_epsilon'], '.2f')}"
        f"  up {line['bytes_up'] / 1e3:.0f} kB  down {line['bytes_down'] / 1e3:.0f} kB  {line['seconds']:.1f}s"
    )


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round}"
