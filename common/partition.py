"""Seeded splits for simulation: a held-out test set, per-site partitions and per-site train/validation splits.

Every function is deterministic for a given seed (numpy's `default_rng`), never depends on Python's `hash()`
or set order, and returns each index list sorted ascending as plain Python ints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from fedtune.common.errors import ConfigError, DataError
from fedtune.common.partition_spec import PartitionSpec, parse_partition  # noqa: F401  (used here, and re-exported)

logger = logging.getLogger(__name__)

# Bounded so an impossible request fails in well under a second instead of looping forever.
_MAX_DIRICHLET_DRAWS = 100
# One random stream per function, so reusing one seed for the hold-out split and the partition does not
# replay the same permutation on both.
_HOLDOUT_STREAM, _PARTITION_STREAM, _TRAIN_VAL_STREAM = 1, 2, 3


@dataclass(frozen=True)
class Split:
    """Two disjoint, sorted index lists. From `train_val_split`, `test` holds the validation indices."""

    train: list[int]
    test: list[int]


def holdout_split(n: int, *, test_fraction: float, seed: int, labels: Sequence[str] | None = None) -> Split:
    """Split `range(n)` into train and test, stratified by label when `labels` are given.

    The test side gets round(n * test_fraction) examples, at least one and at most n - 1. When stratified,
    that count is shared out over labels in proportion to their counts (largest remainders, ties to the
    label that sorts first), so a label's test share is within one example of its exact share.

    Raises:
        ConfigError: if `test_fraction` is not in (0, 1), n < 2, or `seed` is not a non-negative integer.
        DataError: if `labels` does not hold n labels.
    """
    _check_fraction("test_fraction", test_fraction)
    if n < 2:
        raise ConfigError(f"holdout_split needs n >= 2 to put an example on each side, got n={n}.")
    rng = _rng(seed, _HOLDOUT_STREAM)
    n_test = _side_count(n, test_fraction)
    if labels is None:
        test = rng.permutation(n)[:n_test].tolist()
    else:
        if len(labels) != n:
            raise DataError(f"holdout_split got {len(labels)} labels for n={n} examples; pass one per example.")
        by_label = _group(range(n), labels)
        quotas = _apportion(n_test, {label: len(members) for label, members in by_label.items()})
        test = []
        for label in sorted(by_label):
            test.extend(rng.permutation(by_label[label])[: quotas[label]].tolist())
    in_test = set(test)
    return Split(train=[i for i in range(n) if i not in in_test], test=sorted(in_test))


def partition_indices(
    indices: Sequence[int],
    labels: Sequence[str],
    *,
    num_sites: int,
    spec: PartitionSpec,
    seed: int,
    column_values: Sequence[str] | None = None,
    min_per_site: int = 8,
) -> list[list[int]]:
    """Spread `indices` over `num_sites` sites; each index lands in exactly one site.

    `labels` and `column_values` are whole-table columns, looked up *by index* (`labels[i]` for each i in
    `indices`), so a table's columns can be passed as they are with the train side of a `holdout_split`.

    - iid: shuffle, then cut into near-equal chunks (sizes differ by at most one).
    - dirichlet: label skew as in Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data Distribution
      for Federated Visual Classification") and NIID-Bench (Li et al. 2022): for each label, site shares
      are drawn from Dirichlet(alpha, ..., alpha) and that label's examples are cut accordingly. The whole
      draw is repeated (at most 100 times) until every site has `min_per_site` examples.
    - column: one site per distinct value of `column_values`, in sorted string order (site i holds the
      i-th smallest value); `num_sites` must equal the number of distinct values. The seed is not used.

    Every kind guarantees each site at least `min_per_site` examples, since a site with almost no data
    cannot train, let alone under DP.

    Returns:
        One sorted list of indices per site.

    Raises:
        ConfigError: if `num_sites` or `min_per_site` is < 1, there are too few examples, a Dirichlet draw
            never satisfies `min_per_site`, or for 'column' the values are missing or their count of
            distinct values differs from `num_sites` (both are named).
        DataError: if an index repeats or is out of range, or `column_values` and `labels` differ in length.
    """
    if not (isinstance(num_sites, int) and num_sites >= 1):
        raise ConfigError(f"`num_sites` must be an integer >= 1, got {num_sites!r}.")
    if not (isinstance(min_per_site, int) and min_per_site >= 1):
        raise ConfigError(f"`min_per_site` must be an integer >= 1, got {min_per_site!r}.")
    pool = _unique_indices(indices, len(labels))
    if spec.kind == "column":
        return _by_column(pool, labels, spec, num_sites, column_values, min_per_site)
    if len(pool) < num_sites * min_per_site:
        raise ConfigError(
            f"partition {str(spec)!r}: {len(pool)} examples cannot give {num_sites} sites {min_per_site} each "
            f"(needs {num_sites * min_per_site}); use fewer sites or a smaller min_per_site."
        )
    rng = _rng(seed, _PARTITION_STREAM)
    if spec.kind == "iid":
        return [sorted(chunk.tolist()) for chunk in np.array_split(rng.permutation(pool), num_sites)]
    # PartitionSpec guarantees alpha for 'dirichlet'; the cast only informs the type checker.
    return _dirichlet(pool, labels, num_sites, cast(float, spec.alpha), min_per_site, rng)


def train_val_split(indices: Sequence[int], *, val_fraction: float, seed: int) -> Split:
    """Split one site's indices into train and validation; the validation indices are in `Split.test`.

    The validation side gets round(len(indices) * val_fraction) examples, at least one and at most all but
    one. Give each site its own seed (e.g. seed + site number) so sites do not draw alike.

    Raises:
        ConfigError: if `val_fraction` is not in (0, 1), there are fewer than 2 indices, or the seed is bad.
        DataError: if an index repeats.
    """
    _check_fraction("val_fraction", val_fraction)
    pool = _unique_indices(indices, None)
    if len(pool) < 2:
        raise ConfigError(f"train_val_split needs at least 2 indices to put one on each side, got {len(pool)}.")
    shuffled = _rng(seed, _TRAIN_VAL_STREAM).permutation(pool).tolist()
    n_val = _side_count(len(pool), val_fraction)
    return Split(train=sorted(shuffled[n_val:]), test=sorted(shuffled[:n_val]))


def _dirichlet(
    pool: list[int],
    labels: Sequence[str],
    num_sites: int,
    alpha: float,
    min_per_site: int,
    rng: np.random.Generator,
) -> list[list[int]]:
    by_label = _group(pool, labels)
    smallest = 0
    for draw in range(1, _MAX_DIRICHLET_DRAWS + 1):
        sites: list[list[int]] = [[] for _ in range(num_sites)]
        for label in sorted(by_label):
            members = rng.permutation(by_label[label])
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, part in zip(sites, np.split(members, cuts)):
                site.extend(part.tolist())
        smallest = min(len(site) for site in sites)
        if smallest >= min_per_site:
            logger.debug("dirichlet:%s gave every site >= %d examples on draw %d", alpha, min_per_site, draw)
            return [sorted(site) for site in sites]
    raise ConfigError(
        f"partition 'dirichlet:{alpha!r}': after {_MAX_DIRICHLET_DRAWS} draws some site still had fewer than "
        f"{min_per_site} of {len(pool)} examples (smallest site on the last draw: {smallest}); "
        "raise alpha, use fewer sites or lower min_per_site."
    )


def _by_column(
    pool: list[int],
    labels: Sequence[str],
    spec: PartitionSpec,
    num_sites: int,
    column_values: Sequence[str] | None,
    min_per_site: int,
) -> list[list[int]]:
    if column_values is None:
        raise ConfigError(
            f"partition {str(spec)!r} needs the values of column {spec.column!r}; "
            f"load the table with extra_columns=[{spec.column!r}] and pass them as column_values."
        )
    if len(column_values) != len(labels):
        raise DataError(
            f"column {spec.column!r} has {len(column_values)} values but there are {len(labels)} labels."
        )
    by_value = _group(pool, column_values)
    values = sorted(by_value)
    if len(values) != num_sites:
        raise ConfigError(
            f"partition {str(spec)!r} makes one site per distinct value: found {len(values)} values "
            f"{values[:20]!r}{' ...' if len(values) > 20 else ''} but num_sites is {num_sites}; "
            f"set num_sites to {len(values)}."
        )
    small = {value: len(by_value[value]) for value in values if len(by_value[value]) < min_per_site}
    if small:
        raise ConfigError(
            f"partition {str(spec)!r}: site(s) with fewer than {min_per_site} examples: {small}; "
            "merge those values or lower min_per_site."
        )
    return [sorted(by_value[value]) for value in values]


def _rng(seed: int, stream: int) -> np.random.Generator:
    if isinstance(seed, bool) or not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ConfigError(f"`seed` must be a non-negative integer, got {seed!r}.")
    return np.random.default_rng([int(seed), stream])


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ConfigError(f"`{name}` must be in (0, 1), got {value!r}.")


def _side_count(n: int, fraction: float) -> int:
    return max(1, min(n - 1, round(n * fraction)))


def _unique_indices(indices: Sequence[int], size: int | None) -> list[int]:
    pool = [int(i) for i in indices]
    seen: set[int] = set()
    for i in pool:
        if i in seen:
            raise DataError(f"index {i} appears more than once; each example must be in exactly one place.")
        if size is not None and not 0 <= i < size:
            raise DataError(f"index {i} is out of range for {size} labels.")
        seen.add(i)
    return pool


def _group(pool: Sequence[int] | range, keys: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i in pool:
        groups.setdefault(keys[i], []).append(i)
    return groups


def _apportion(total: int, counts: dict[str, int]) -> dict[str, int]:
    """Share `total` over keys in proportion to `counts` (largest remainders), in exact integer arithmetic."""
    n = sum(counts.values())
    quotas = {key: total * count // n for key, count in counts.items()}
    leftover = total - sum(quotas.values())
    by_remainder = sorted(counts, key=lambda key: (-(total * counts[key] % n), key))
    for key in by_remainder[:leftover]:
        quotas[key] += 1
    return quotas
