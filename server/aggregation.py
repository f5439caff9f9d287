"""Robust aggregation rules: pure functions over the sites' individual adapter updates.

A robust rule bounds what a minority of sites can do to the aggregate, whatever they send: a
site whose update is scaled by 100 or sign-flipped moves FedAvg's mean arbitrarily far, but not
the coordinate-wise median, the trimmed mean or (Multi-)Krum's choice. The rules here act on
*updates* Delta_k = w_k - w_t (the site's adapter minus the global adapter w_t the round started
from, :func:`updates_from`) and the caller adds the aggregate back: w_{t+1} = w_t + rule(Delta).
Every rule here is translation-equivariant (rule(x + c) = rule(x) + c), so this is the same as
applying it to the adapters themselves; updates keep the numbers small and make a zero update
(a site that did not move) an exact zero.

Unweighted, on purpose. FedAvg weights a site by the number of examples it reports; a robust
rule counts sites, because its guarantee is stated for "at most F of the n updates are
arbitrary", and the reported count is itself part of what a Byzantine site controls (a site
claiming a million examples would own any example-weighted median or trimmed mean). The FedAvg
weights are therefore accepted by :func:`robust_aggregate` only to say so, and ignored.

Rules (F: the number of Byzantine sites tolerated; n: the updates received this round):

- ``median``: coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML 2018). With F < n / 2 arbitrary
  updates, every coordinate of the result lies between the smallest and the largest honest value
  of that coordinate. Any n >= 1.
- ``trimmed-mean:BETA``: coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, sort the
  n values, drop k = floor(BETA n) from each end, average the n - 2k left. With F <= k arbitrary
  updates, every coordinate lies between the smallest and largest honest value. BETA < 1/2 keeps
  n - 2k >= 1, so any n >= 1 works (with k = 0 it is the plain unweighted mean).
- ``krum:F``: Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017). Each update i is scored by the sum of its
  squared L2 distances to its n - F - 2 nearest other updates (over the whole flattened adapter
  update, all tensors together); the update with the lowest score is the result. Needs
  n > 2F + 2 (the paper's condition); fewer updates raise :class:`TooFewUpdates`.
  Deterministic consequence used by the tests: if the honest updates lie within pairwise distance
  D of each other and within R of their mean, Krum's result lies within sqrt(n - F - 2) D + R of
  the honest mean (an honest update's score is at most (n - F - 2) D^2; a chosen Byzantine update
  scores no more, and at least n - 2F - 1 >= 1 of its n - F - 2 neighbours are honest).
- ``multi-krum:F``: Multi-Krum (Blanchard et al. 2017, Section 5): the unweighted mean of the
  m best-scored updates, with m = n - F, the choice of the paper's experiments (every update is
  used when F = 0, so it degrades to the plain mean; a smaller m trades variance for margin).
  Same n > 2F + 2. Each chosen Byzantine update leaves an honest one out, whose score bounds its
  own, so the same sqrt(n - F - 2) D + R bound holds for every chosen update and for their mean.
  Robustness of Multi-Krum as such: Bareilles, Bouaziz, Fageot, El Mhamdi, arXiv:2602.03899 (2026).

Ties in Krum's scores go to the update received first (a stable sort), so results are
reproducible from the order of the replies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fedtune.common.config import AggregationSpec
from fedtune.common.errors import FedtuneError, UpdateError, check_tensor_names

Arrays = Mapping[str, np.ndarray]


class TooFewUpdates(FedtuneError):
    """A robust rule got fewer updates than its guarantee needs; nothing was aggregated.

    Attributes:
        rule: The rule as configured (e.g. 'krum:1').
        updates: n, the updates received.
        byzantine: F, the Byzantine sites the rule tolerates.
        needed: The least n the rule accepts.
    """

    code = "internal-error"

    def __init__(self, *, rule: str, updates: int, byzantine: int, needed: int, why: str) -> None:
        self.rule, self.updates, self.byzantine, self.needed = rule, updates, byzantine, needed
        super().__init__(f"{rule} needs at least {needed} updates ({why}), got n = {updates} with F = {byzantine}")


@dataclass(frozen=True, kw_only=True)
class RobustResult:
    """What :func:`robust_aggregate` returns.

    Attributes:
        update: name -> float64 array: the aggregate update, to be added to the global adapter.
        selected: Indices (into the updates given) of the updates the result is the mean of, for
            Krum and Multi-Krum; every index for the coordinate-wise rules.
        scores: Krum's score of every update (None for the coordinate-wise rules).
    """

    update: dict[str, np.ndarray]
    selected: tuple[int, ...]
    scores: tuple[float, ...] | None = None


def min_updates(spec: AggregationSpec) -> int:
    """The least number of updates the rule accepts: 2F + 3 for (Multi-)Krum, 1 otherwise."""
    return 2 * spec.byzantine + 3 if spec.rule in ("krum", "multi-krum") else 1


def update_delta(update: Arrays, global_arrays: Arrays, *, source: str = "update") -> dict[str, np.ndarray]:
    """The delta Delta_k = w_k - w_t of one site's update against the global adapter, in float64.

    Args:
        update: the site's adapter after local training, name -> array.
        global_arrays: the global adapter the site started from, name -> array.
        source: how errors name the update.

    Returns:
        name -> float64 array, for every name of `global_arrays` (in its order).

    Raises:
        UpdateError: the names or shapes differ.
    """
    check_tensor_names(global_arrays, update, source=source)
    delta = {}
    for name, ref in global_arrays.items():
        got = np.asarray(update[name])
        if got.shape != np.shape(ref):
            raise UpdateError(f"{source}: tensor {name} has shape {list(got.shape)}, expected {list(np.shape(ref))}")
        delta[name] = got.astype(np.float64) - np.asarray(ref, dtype=np.float64)
    return delta


def updates_from(adapters: Sequence[Arrays], global_arrays: Arrays) -> list[dict[str, np.ndarray]]:
    """Delta_k = w_k - w_t in float64 for each site adapter w_k, in the global adapter's tensor order.

    Raises:
        UpdateError: an adapter whose tensor names or shapes differ from the global adapter's.
    """
    return [update_delta(adapter, global_arrays, source=f"update {k}") for k, adapter in enumerate(adapters)]


def _stack(updates: Sequence[Arrays]) -> tuple[list[str], dict[str, tuple[int, ...]], np.ndarray]:
    """Names, shapes and an (n, d) float64 matrix of the flattened updates; refuses mismatches and non-finite values."""
    if not updates:
        raise ValueError("a robust rule needs at least one update; got none (the caller keeps the global adapter)")
    names = list(updates[0])
    shapes = {name: tuple(np.shape(updates[0][name])) for name in names}
    rows = []
    for k, update in enumerate(updates):
        check_tensor_names(names, update, source=f"update {k}")
        for name in names:
            if tuple(np.shape(update[name])) != shapes[name]:
                raise UpdateError(f"update {k}: tensor {name} has shape {list(np.shape(update[name]))}, expected {list(shapes[name])}")
        rows.append(np.concatenate([np.asarray(update[name], dtype=np.float64).ravel() for name in names]) if names else np.zeros(0))
    matrix = np.stack(rows)
    if not np.isfinite(matrix).all():
        # Screening rejects these before a rule runs; a rule must never sort or average them.
        bad = sorted({int(i) for i in np.nonzero(~np.isfinite(matrix))[0]})
        raise UpdateError(f"updates {bad} have NaN or Inf values")
    return names, shapes, matrix


def _unstack(vector: np.ndarray, names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name in names:
        size = math.prod(shapes[name])
        out[name] = vector[start : start + size].reshape(shapes[name])
        start += size
    return out


def coordinate_median(updates: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """The coordinate-wise median of the updates (Yin et al. 2018); see the module docstring.

    With an even n, a coordinate's median is the mean of its two middle values.

    Raises:
        ValueError: no update. UpdateError: mismatched names or shapes, NaN or Inf values.
    """
    names, shapes, x = _stack(updates)
    n = x.shape[0]
    s = np.sort(x, axis=0)
    mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0
    return _unstack(mid, names, shapes)


def trim_count(beta: float, n: int) -> int:
    """k = floor(BETA n), with BETA read as the decimal it was written as (0.29 * 100 is 29, not 28.999...)."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean's BETA must be in [0, 0.5), got {beta!r}")
    return math.floor(Fraction(repr(float(beta))) * n)


def trimmed_mean(updates: Sequence[Arrays], beta: float) -> dict[str, np.ndarray]:
    """The coordinate-wise trimmed mean (Yin et al. 2018): drop floor(BETA n) values at each end, average the rest.

    Raises:
        ValueError: no update, or BETA outside [0, 0.5). UpdateError: mismatched updates, NaN or Inf.
    """
    names, shapes, x = _stack(updates)
    n = x.shape[0]
    k = trim_count(beta, n)
    kept = np.sort(x, axis=0)[k : n - k]
    return _unstack(kept.mean(axis=0), names, shapes)


def _check_krum(rule: str, n: int, byzantine: int) -> None:
    if byzantine < 0:
        raise ValueError(f"{rule}: F must be >= 0, got {byzantine}")
    if n <= 2 * byzantine + 2:
        raise TooFewUpdates(
            rule=f"{rule}:{byzantine}", updates=n, byzantine=byzantine, needed=2 * byzantine + 3,
            why="Krum's guarantee holds for n > 2F + 2, Blanchard et al. 2017",
        )


def krum_scores(updates: Sequence[Arrays], byzantine: int) -> np.ndarray:
    """Krum's score of each update: the sum of squared L2 distances to its n - F - 2 nearest other updates.

    Distances are over the whole flattened update (every tensor together), computed as sums of
    squared differences (no Gram-matrix shortcut, whose cancellation would misorder close updates).

    Raises:
        TooFewUpdates: n <= 2F + 2. ValueError: F < 0 or no update. UpdateError: mismatched updates, NaN or Inf.
    """
    _, _, x = _stack(updates)
    _check_krum("krum", x.shape[0], byzantine)
    return _krum_scores(x, byzantine)


def _krum_scores(x: np.ndarray, byzantine: int) -> np.ndarray:
    n = x.shape[0]
    neighbours = n - byzantine - 2
    scores = np.empty(n)
    for i in range(n):
        d2 = np.sum((x - x[i]) ** 2, axis=1)
        scores[i] = np.sort(np.delete(d2, i))[:neighbours].sum()
    return scores


def krum(updates: Sequence[Arrays], byzantine: int, *, select: int = 1) -> RobustResult:
    """Krum (``select`` = 1) or Multi-Krum (the mean of the ``select`` best-scored updates), Blanchard et al. 2017.

    Args:
        updates: one name -> array mapping per site.
        byzantine: F >= 0, the Byzantine sites tolerated; needs n > 2F + 2.
        select: m, 1 <= m <= n - F; ties go to the update given first.

    Raises:
        TooFewUpdates: n <= 2F + 2. ValueError: F or m out of range, no update.
        UpdateError: mismatched updates, NaN or Inf.
    """
    names, shapes, x = _stack(updates)
    n = x.shape[0]
    rule = "krum" if select == 1 else "multi-krum"
    _check_krum(rule, n, byzantine)
    if not 1 <= select <= n - byzantine:
        raise ValueError(f"{rule}: m must be in [1, n - F] = [1, {n - byzantine}], got {select}")
    scores = _krum_scores(x, byzantine)
    chosen = np.argsort(scores, kind="stable")[:select]
    return RobustResult(
        update=_unstack(x[chosen].mean(axis=0), names, shapes),
        selected=tuple(int(i) for i in chosen),
        scores=tuple(float(s) for s in scores),
    )


def robust_aggregate(spec: AggregationSpec, updates: Sequence[Arrays], weights: Sequence[float] | None = None) -> RobustResult:
    """Apply the robust rule of ``spec`` to the sites' updates; the result is the aggregate *update*.

    Args:
        spec: a parsed ``federation.aggregation`` whose rule is robust (``spec.robust``).
        updates: one Delta_k = w_k - w_t per site (see :func:`updates_from`), in the order received.
        weights: the sites' FedAvg weights (examples). Ignored: robust rules count sites, not
            examples (a reported count is part of what a Byzantine site controls; module docstring).

    Raises:
        ValueError: a rule that is not robust, or no update.
        TooFewUpdates: fewer updates than the rule needs (:func:`min_updates`).
        UpdateError: updates whose names or shapes differ, NaN or Inf values.
    """
    del weights  # unweighted by design: see the module docstring
    if spec.rule == "median":
        return RobustResult(update=coordinate_median(updates), selected=tuple(range(len(updates))))
    if spec.rule == "trimmed-mean":
        return RobustResult(update=trimmed_mean(updates, spec.trim), selected=tuple(range(len(updates))))
    if spec.rule == "krum":
        return krum(updates, spec.byzantine, select=1)
    if spec.rule == "multi-krum":
        n = len(updates)
        _check_krum("multi-krum", n, spec.byzantine)
        return krum(updates, spec.byzantine, select=n - spec.byzantine)
    raise ValueError(f"{spec.rule!r} is not a robust rule; robust rules: median, trimmed-mean, krum, multi-krum")
