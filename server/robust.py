"""Robust aggregation as a Flower strategy wrapper (the math is in :mod:`fedtune.server.aggregation`).

:class:`RobustAggregation` wraps a strategy (FedAvg) the way ``ClientLevelDP`` does: sampling and
evaluation are the inner strategy's; ``aggregate_train`` is replaced. The round loop
(``server/rounds.py``) screens every reply first and hands only accepted ones to
``aggregate_train``, so the rule sees well-formed, finite updates.

Which settings combine with a robust rule is decided by :func:`aggregation_problems`:

- Not with secure aggregation (refused by ``RunConfig`` itself): a robust rule needs each site's
  update, and SecAgg+ shows the coordinator only their sum.
- Not with client-level DP: DP-FedAvg's noise is calibrated to one site's effect on the *sum* of
  clipped updates (at most C, hence C / m on the mean). A median or a Krum choice is not a sum: one
  site can move a median by the gap between its neighbours and swap Krum's chosen update wholesale,
  so the accounted epsilon would not hold for what is released.
- With a server optimiser (``federation.server_opt``): ``make_strategy`` puts the optimiser
  outside this wrapper, so it steps from the robust aggregate as it would from FedAvg's mean
  (post-processing of the rule's output; a round the rule skips is a round with no step).
- (Multi-)Krum needs n > 2F + 2 updates: a run that samples fewer sites per round is refused
  before round 1; a round where too few updates are accepted (dropouts, rejections) keeps the
  global adapter and logs why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.common.config import AggregationSpec, RunConfig
from fedtune.common.errors import ConfigError, UpdateError

from .aggregation import TooFewUpdates, min_updates, robust_aggregate, updates_from
from .screening import site_name

logger = logging.getLogger(__name__)

METRIC_SITES = "robust-sites"
METRIC_SELECTED = "robust-selected"
METRIC_SKIPPED = "robust-skipped"


def planned_sites_per_round(run: RunConfig) -> int:
    """The sites FedAvg samples each round when all planned sites are connected: max(floor(N f), min_sites)."""
    fed = run.federation
    return max(int(fed.sites * fed.fraction_train), fed.min_sites)


def aggregation_problems(run: RunConfig) -> list[str]:
    """What a run's aggregation settings cannot do together (empty: fine); see the module docstring."""
    fed, problems = run.federation, []
    if fed.max_update_norm > 0 and run.secure_agg.enabled:
        problems.append(
            f"federation.max_update_norm = {fed.max_update_norm:g} cannot be combined with secure_agg: the bound is "
            "checked on each site's update, and secure aggregation shows the coordinator only their sum."
        )
    spec = fed.aggregation_spec
    if not spec.robust:
        return problems
    if run.client_dp.enabled:
        problems.append(
            f"federation.aggregation = {fed.aggregation!r} cannot be combined with client_dp: DP-FedAvg's noise is "
            "calibrated to one site's effect on the sum of clipped updates, which bounds neither a median nor Krum's choice."
        )
    need, planned = min_updates(spec), planned_sites_per_round(run)
    if planned < need:
        problems.append(
            f"federation.aggregation = {fed.aggregation!r} needs at least {need} updates per round (n > 2F + 2, "
            f"Blanchard et al. 2017), but the run samples {planned} (federation.sites = {fed.sites}, fraction_train = "
            f"{fed.fraction_train:g}, min_sites = {fed.min_sites}): sample more sites or lower F."
        )
    return problems


class RobustAggregation(Strategy):
    """A robust rule (median, trimmed mean, Krum, Multi-Krum) over the sites' updates, around a Flower strategy.

    ``configure_train`` is the inner strategy's (its sampling), and the global adapter it sends is
    remembered. ``aggregate_train`` turns each reply's adapter into an update against that global
    adapter, applies the rule (unweighted: see :mod:`fedtune.server.aggregation`) and returns
    global + aggregate, with the global's names, order and dtype. With no reply it returns
    (None, None), as FedAvg does; when the rule refuses (Krum with n <= 2F + 2) it returns None
    and a MetricRecord saying so, and the round loop keeps the global adapter. Evaluation and
    ``summary`` are delegated.

    The round's MetricRecord: ``robust-sites`` (n), ``robust-selected`` (updates averaged into
    the result; Krum: 1), or ``robust-skipped`` = 1 when the rule refused.

    Args:
        inner: the strategy that samples and evaluates (e.g. FedAvg).
        spec: a robust ``federation.aggregation`` (``spec.robust``).
        arrayrecord_key: the key of the reply's adapter (FedAvg's default).
    """

    def __init__(self, inner: Strategy, spec: AggregationSpec, *, arrayrecord_key: str = "arrays") -> None:
        problems = []
        if not isinstance(inner, Strategy):
            problems.append(f"`inner` must be a flwr.serverapp.strategy.Strategy, got {type(inner).__name__}.")
        if not isinstance(spec, AggregationSpec) or not spec.robust:
            problems.append(f"`spec` must be a robust federation.aggregation (median, trimmed-mean, krum, multi-krum), got {spec!r}.")
        if problems:
            raise ConfigError(problems)
        self.inner = inner
        self.spec = spec
        self.arrayrecord_key = arrayrecord_key
        self._global: ArrayRecord | None = None
        self._global_round: int | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The inner strategy's train messages; the global adapter is remembered for the updates."""
        self._global, self._global_round = arrays, server_round
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Global + the rule's aggregate of the replies' updates (see the class docstring)."""
        if self._global is None or self._global_round != server_round:
            raise RuntimeError(
                f"aggregate_train for round {server_round}, but configure_train was last called for "
                f"round {self._global_round}: the global adapter of this round is unknown"
            )
        global_arrays = {name: arr.numpy() for name, arr in self._global.items()}
        sites, adapters = [], []
        for reply in replies:
            if reply.has_error():
                continue
            try:
                record = reply.content.array_records[self.arrayrecord_key]
                adapters.append({name: arr.numpy() for name, arr in record.items()})
            except (KeyError, ValueError, TypeError) as err:
                logger.warning("round %d: update from %s not used: %s", server_round, site_name(reply), err)
                continue
            sites.append(site_name(reply))
        if not adapters:
            return None, None
        rule = self.spec_text
        try:
            result = robust_aggregate(self.spec, updates_from(adapters, global_arrays))
        except TooFewUpdates as err:
            logger.warning("round %d: %s; the global adapter is kept", server_round, err)
            return None, MetricRecord({METRIC_SITES: len(adapters), METRIC_SKIPPED: 1})
        except UpdateError as err:  # screening should have caught it; never aggregate around it
            logger.warning("round %d: %s not applied: %s; the global adapter is kept", server_round, rule, err)
            return None, MetricRecord({METRIC_SITES: len(adapters), METRIC_SKIPPED: 1})
        new = ArrayRecord(
            {
                name: Array.from_numpy_ndarray((np.asarray(ref, dtype=np.float64) + result.update[name]).astype(ref.dtype, copy=False))
                for name, ref in global_arrays.items()
            }
        )
        if self.spec.rule in ("krum", "multi-krum"):
            logger.info("round %d: %s over %d updates chose %s", server_round, rule, len(adapters), [sites[i] for i in result.selected])
        else:
            logger.info("round %d: %s over %d updates", server_round, rule, len(adapters))
        return new, MetricRecord({METRIC_SITES: len(adapters), METRIC_SELECTED: len(result.selected)})

    @property
    def spec_text(self) -> str:
        s = self.spec
        return {"trimmed-mean": f"trimmed-mean:{s.trim:g}", "krum": f"krum:{s.byzantine}", "multi-krum": f"multi-krum:{s.byzantine}"}.get(s.rule, s.rule)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegated to the inner strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegated to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the rule, then the inner strategy's summary."""
        logger.info("robust aggregation: %s over site updates, unweighted (needs >= %d updates a round)", self.spec_text, min_updates(self.spec))
        self.inner.summary()


def robust_strategy(inner: Strategy, run: RunConfig) -> Strategy:
    """``inner`` wrapped in :class:`RobustAggregation` when ``federation.aggregation`` is robust, else ``inner``.

    Raises:
        ConfigError: every problem :func:`aggregation_problems` finds (also for non-robust rules:
            ``max_update_norm`` with secure aggregation).
    """
    problems = aggregation_problems(run)
    if problems:
        raise ConfigError(problems)
    spec = run.federation.aggregation_spec
    return RobustAggregation(inner, spec) if spec.robust else inner
