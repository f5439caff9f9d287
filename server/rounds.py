"""The coordinator's round loop over a Flower Grid, around a swappable Flower strategy.

The strategy (FedAvg by default; any ``flwr.serverapp.strategy.Strategy``) samples sites and
aggregates; this loop adds what a regulated deployment needs around it: every update screened
before aggregation, a checkpoint and a metrics line after every round, per-site privacy kept
per site (never averaged), and the bytes that crossed the wire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.common.config import SecureAggConfig

from .records import RunRecorder
from .screening import Rejection, arrays_nbytes, screen_train_replies, site_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestScore:
    accuracy: float
    macro_f1: float
    loss: float


@dataclass
class RoundTotals:
    bytes_up: int = 0
    bytes_down: int = 0


def _weighted(metrics: list[dict], key: str) -> float | None:  # type: ignore[type-arg]
    pairs = [(float(m[key]), int(m["num-examples"])) for m in metrics if key in m]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    *,
    initial: ArrayRecord,
    num_rounds: int,
    round_config: ConfigRecord,
    timeout: float,
    recorder: RunRecorder,
    checkpoint: Callable[[int, ArrayRecord], None],
    test_fn: Callable[[ArrayRecord], TestScore] | None = None,
    secure: SecureAggConfig | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[ArrayRecord, RoundTotals]:
    """Run ``num_rounds`` rounds; returns the final global adapter and the bytes exchanged.

    With ``secure`` enabled, each training exchange runs as SecAgg+ and its unmasked mean replaces
    the strategy's aggregation (a weighted mean is all the protocol yields); a round the protocol
    cannot finish raises :class:`~fedtune.server.secure_agg.SecureAggregationError`.
    """
    arrays = initial
    totals = RoundTotals()
    for server_round in range(1, num_rounds + 1):
        started = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(round_config)), grid))
        secure_record = None
        if secure is not None and secure.enabled:
            from .secure_agg import secure_train_round

            outcome = secure_train_round(
                grid, messages, server_round=server_round, expected=arrays, settings=secure, timeout=timeout
            )
            arrays = outcome.aggregate
            updates = [(site_name(m), dict(m.content.config_records["fitres.metrics"])) for m in outcome.updates]
            rejected = [Rejection(site_name(m), f"site error: {m.error.reason}") for m in outcome.errors]
            up, down = outcome.bytes_up, outcome.bytes_down
            strategy_metrics = None
            secure_record = {
                "protocol": "SecAgg+",
                "sites_sampled": len(messages),
                "threshold": outcome.threshold,
                "quantization_range": outcome.quantization_range,
                "quantization_error_bound": outcome.error_bound,
            }
        else:
            down = arrays_nbytes(arrays) * len(messages)
            replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
            accepted, rejected = screen_train_replies(replies, arrays)
            up = sum(arrays_nbytes(m.content.array_records["arrays"]) for m in accepted)
            if not accepted:
                logger.warning("round %d: no usable update (%d sites sampled)", server_round, len(messages))
            # Called even with no update: a DP strategy must still release a noised adapter, or an
            # unchanged one would reveal that no sampled site took part.
            new_arrays, strategy_metrics = strategy.aggregate_train(server_round, accepted)
            if new_arrays is not None:
                arrays = new_arrays
            updates = [(site_name(m), dict(m.content.metric_records["metrics"])) for m in accepted]
        for name, metrics in updates:
            recorder.site(name).update(server_round, metrics)

        eval_messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(round_config)), grid))
        down += arrays_nbytes(arrays) * len(eval_messages)
        eval_replies = [m for m in grid.send_and_receive(eval_messages, timeout=timeout) if not m.has_error()] if eval_messages else []
        evaluations = [dict(m.content.metric_records["metrics"]) for m in eval_replies]
        trained = [metrics for _, metrics in updates]

        score = test_fn(arrays) if test_fn else None
        checkpoint(server_round, arrays)
        totals.bytes_up += up
        totals.bytes_down += down
        epsilons = {name: float(metrics["epsilon"]) for name, metrics in updates}
        line = {
            "round": server_round,
            "sites_sampled": len(messages),
            "sites_replied": len(updates),
            "sites_rejected": [{"site": r.site, "reason": r.reason} for r in rejected],
            "train_loss": _weighted(trained, "train-loss"),
            "loss": _weighted(evaluations, "loss"),
            "accuracy": _weighted(evaluations, "accuracy"),
            "macro_f1": _weighted(evaluations, "macro-f1"),
            "test_accuracy": score.accuracy if score else None,
            "test_macro_f1": score.macro_f1 if score else None,
            "epsilon_by_site": epsilons,
            "max_epsilon": max(epsilons.values()) if epsilons else None,
            # Only the strategy's own figures: a mean of the sites' epsilons would mislead.
            "client_dp": {k: v for k, v in dict(strategy_metrics or {}).items() if str(k).startswith("client-dp-")} or None,
            "secure_agg": secure_record,
            "bytes_up": up,
            "bytes_down": down,
            "seconds": round(time.perf_counter() - started, 3),
        }
        recorder.add_round(line)
        echo(_round_line(line, num_rounds))
    return arrays, totals


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _round_line(line: dict, num_rounds: int) -> str:  # type: ignore[type-arg]
    acc = line["test_accuracy"] if line["test_accuracy"] is not None else line["accuracy"]
    return (
        f"round {line['round']}/{num_rounds}  sites {line['sites_replied']}/{line['sites_sampled']}"
        f"  train-loss {_fmt(line['train_loss'], '.4f')}  val-loss {_fmt(line['loss'], '.4f')}"
        f"  accuracy {_fmt(acc, '.3f')}  max-epsilon {_fmt(line['max_epsilon'], '.2f')}"
        f"  up {line['bytes_up'] / 1e3:.0f} kB  down {line['bytes_down'] / 1e3:.0f} kB  {line['seconds']:.1f}s"
    )


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round}"
