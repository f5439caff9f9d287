"""Seeded splits: partition specs, the hold-out split, per-site partitions and train/validation splits."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from fedtune.common.errors import ConfigError, DataError
from fedtune.common.partition import (
    PartitionSpec,
    Split,
    holdout_split,
    parse_partition,
    partition_indices,
    train_val_split,
)

IID = PartitionSpec(kind="iid")


def balanced_labels(num_labels: int, per_label: int) -> list[str]:
    # Interleaved so that label and index order are unrelated.
    return [f"label{i % num_labels}" for i in range(num_labels * per_label)]


def mean_label_entropy(sites: list[list[int]], labels: list[str]) -> float:
    """Mean over sites of the Shannon entropy (nats) of the site's label distribution."""
    entropies = []
    for site in sites:
        counts = Counter(labels[i] for i in site)
        total = sum(counts.values())
        entropies.append(-sum(c / total * math.log(c / total) for c in counts.values()))
    return sum(entropies) / len(entropies)


def assert_disjoint_and_complete(sites: list[list[int]], indices: list[int]) -> None:
    flat = [i for site in sites for i in site]
    assert len(flat) == len(set(flat)), "an index landed in two sites"
    assert sorted(flat) == sorted(indices), "indices were lost or invented"


# --- parse_partition -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("iid", PartitionSpec(kind="iid")),
        ("dirichlet:0.5", PartitionSpec(kind="dirichlet", alpha=0.5)),
        ("dirichlet:1", PartitionSpec(kind="dirichlet", alpha=1.0)),
        ("dirichlet:1e-2", PartitionSpec(kind="dirichlet", alpha=0.01)),
        ("column:hospital", PartitionSpec(kind="column", column="hospital")),
        ("column:site:id", PartitionSpec(kind="column", column="site:id")),
    ],
)
def test_parse_partition_reads_every_allowed_form_and_round_trips(text, expected):
    # Execute
    spec = parse_partition(text)

    # Assert
    assert spec == expected
    assert parse_partition(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    ["", "IID", "iid:3", "random", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:abc",
     "dirichlet:nan", "dirichlet:inf", "column", "column:", " iid"],
)
def test_parse_partition_rejects_bad_specs_naming_the_value_and_allowed_forms(text):
    # Execute
    with pytest.raises(ConfigError) as info:
        parse_partition(text)

    # Assert
    message = str(info.value)
    assert repr(text) in message
    assert "'iid'" in message and "'dirichlet:ALPHA'" in message and "'column:NAME'" in message


def test_parse_partition_rejects_a_non_string():
    # Execute / Assert
    with pytest.raises(ConfigError, match="got 3"):
        parse_partition(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"kind": "dirichlet"}, "`alpha` must be a finite number > 0"),
        ({"kind": "dirichlet", "alpha": 0.0}, "got 0.0"),
        ({"kind": "iid", "alpha": 0.5}, "`alpha` applies to 'dirichlet' only"),
        ({"kind": "column", "column": ""}, "`column` must name a column"),
        ({"kind": "iid", "column": "h"}, "`column` applies to 'column' only"),
        ({"kind": "shards"}, "`kind` must be"),
    ],
)
def test_partition_spec_validates_itself(kwargs, fragment):
    # Execute / Assert
    with pytest.raises(ConfigError, match=fragment):
        PartitionSpec(**kwargs)


# --- holdout_split ---------------------------------------------------------------------------------------


def test_holdout_split_is_disjoint_complete_and_sized_by_fraction():
    # Execute
    split = holdout_split(100, test_fraction=0.2, seed=0)

    # Assert
    assert len(split.test) == 20
    assert sorted(split.train + split.test) == list(range(100))
    assert not set(split.train) & set(split.test)
    assert split.train == sorted(split.train) and split.test == sorted(split.test)


def test_holdout_split_is_deterministic_for_a_seed_and_varies_across_seeds():
    # Execute
    first, again, other = (holdout_split(50, test_fraction=0.3, seed=s) for s in (7, 7, 8))

    # Assert
    assert first == again
    assert first.test != other.test


def test_holdout_split_stratified_keeps_each_label_share_within_one_example():
    # Prepare: 60 / 30 / 9 / 1 examples, interleaved.
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 9 + ["d"]
    labels = labels[::2] + labels[1::2]

    # Execute
    split = holdout_split(len(labels), test_fraction=0.25, seed=3, labels=labels)

    # Assert
    assert len(split.test) == 25
    assert sorted(split.train + split.test) == list(range(100))
    test_counts = Counter(labels[i] for i in split.test)
    for label, total in Counter(labels).items():
        assert abs(test_counts[label] - total * 0.25) < 1, label


def test_holdout_split_keeps_at_least_one_example_on_each_side():
    # Execute
    tiny = holdout_split(2, test_fraction=0.01, seed=0)
    big = holdout_split(3, test_fraction=0.99, seed=0)

    # Assert
    assert (len(tiny.train), len(tiny.test)) == (1, 1)
    assert (len(big.train), len(big.test)) == (1, 2)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_holdout_split_rejects_fraction_outside_open_unit_interval(fraction):
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"`test_fraction` must be in \(0, 1\)"):
        holdout_split(10, test_fraction=fraction, seed=0)


def test_holdout_split_rejects_labels_of_the_wrong_length():
    # Execute / Assert
    with pytest.raises(DataError, match="got 3 labels for n=10"):
        holdout_split(10, test_fraction=0.2, seed=0, labels=["a", "b", "c"])


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_a_config_error(seed):
    # Execute / Assert
    with pytest.raises(ConfigError, match="`seed` must be a non-negative integer"):
        holdout_split(10, test_fraction=0.2, seed=seed)


# --- partition_indices -----------------------------------------------------------------------------------

LABELS = balanced_labels(num_labels=4, per_label=100)
SPECS = [IID, PartitionSpec(kind="dirichlet", alpha=0.5)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_partition_of_a_subset_is_disjoint_complete_and_respects_min_per_site(spec):
    # Prepare: partition the train side only, with labels looked up by table index.
    train = holdout_split(len(LABELS), test_fraction=0.2, seed=0).train

    # Execute
    sites = partition_indices(train, LABELS, num_sites=5, spec=spec, seed=1)

    # Assert
    assert len(sites) == 5
    assert_disjoint_and_complete(sites, train)
    assert min(len(site) for site in sites) >= 8
    assert all(site == sorted(site) for site in sites)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_partition_is_deterministic_for_a_seed_and_varies_across_seeds(spec):
    # Execute
    first, again, other = (
        partition_indices(range(len(LABELS)), LABELS, num_sites=4, spec=spec, seed=s) for s in (11, 11, 12)
    )

    # Assert
    assert first == again
    assert first != other


def test_iid_sites_differ_in_size_by_at_most_one():
    # Execute
    sites = partition_indices(range(103), ["x"] * 103, num_sites=10, spec=IID, seed=0)

    # Assert
    assert sorted(len(site) for site in sites) == [10] * 7 + [11] * 3


def test_dirichlet_with_small_alpha_is_more_label_skewed_than_iid():
    # Prepare: 10 labels x 100; iid sites see all 10 labels (entropy near ln 10 = 2.30).
    labels = balanced_labels(num_labels=10, per_label=100)

    # Execute
    iid = partition_indices(range(len(labels)), labels, num_sites=10, spec=IID, seed=0)
    skewed = partition_indices(
        range(len(labels)), labels, num_sites=10, spec=PartitionSpec(kind="dirichlet", alpha=0.1), seed=0
    )

    # Assert: seeded, so deterministic; the margin is wide (alpha=0.1 gives sites a handful of labels).
    assert mean_label_entropy(iid, labels) > 2.2
    assert mean_label_entropy(skewed, labels) < mean_label_entropy(iid, labels) - 0.7
    assert_disjoint_and_complete(skewed, list(range(len(labels))))


def test_dirichlet_with_large_alpha_is_close_to_iid():
    # Execute
    sites = partition_indices(
        range(len(LABELS)), LABELS, num_sites=4, spec=PartitionSpec(kind="dirichlet", alpha=1000.0), seed=0
    )

    # Assert
    assert mean_label_entropy(sites, LABELS) > math.log(4) - 0.05


def test_dirichlet_that_cannot_meet_min_per_site_fails_after_bounded_draws():
    # Prepare: one label and alpha=0.01 put nearly everything on one site in every draw.
    labels = ["x"] * 100

    # Execute
    with pytest.raises(ConfigError) as info:
        partition_indices(
            range(100), labels, num_sites=10, spec=PartitionSpec(kind="dirichlet", alpha=0.01), seed=0
        )

    # Assert
    message = str(info.value)
    assert "'dirichlet:0.01'" in message and "after 100 draws" in message and "fewer than 8 of 100" in message


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_too_few_examples_for_the_sites_is_a_config_error(spec):
    # Execute / Assert
    with pytest.raises(ConfigError, match="30 examples cannot give 4 sites 8 each"):
        partition_indices(range(30), ["x"] * 30, num_sites=4, spec=spec, seed=0)


def test_min_per_site_can_be_lowered_for_small_data():
    # Execute
    sites = partition_indices(range(30), ["x"] * 30, num_sites=4, spec=IID, seed=0, min_per_site=1)

    # Assert
    assert [len(site) for site in sites] == [8, 8, 7, 7]


def test_column_partition_gives_one_site_per_value_in_sorted_order():
    # Prepare
    hospitals = ["h2", "h1", "h3", "h1"] * 10
    labels = ["x"] * 40
    spec = parse_partition("column:hospital")

    # Execute
    sites = partition_indices(range(40), labels, num_sites=3, spec=spec, seed=0, column_values=hospitals)

    # Assert
    assert [{hospitals[i] for i in site} for site in sites] == [{"h1"}, {"h2"}, {"h3"}]
    assert [len(site) for site in sites] == [20, 10, 10]
    assert_disjoint_and_complete(sites, list(range(40)))


def test_column_partition_with_wrong_site_count_names_both_counts():
    # Prepare
    hospitals = ["h1", "h2", "h3"] * 10

    # Execute
    with pytest.raises(ConfigError) as info:
        partition_indices(
            range(30), ["x"] * 30, num_sites=4, spec=parse_partition("column:hospital"), seed=0,
            column_values=hospitals,
        )

    # Assert
    message = str(info.value)
    assert "found 3 values ['h1', 'h2', 'h3'] but num_sites is 4" in message


def test_column_partition_without_column_values_says_how_to_load_them():
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"extra_columns=\['hospital'\]"):
        partition_indices(range(30), ["x"] * 30, num_sites=3, spec=parse_partition("column:hospital"), seed=0)


def test_column_partition_rejects_a_value_with_too_few_examples():
    # Prepare
    hospitals = ["big"] * 20 + ["tiny"] * 3

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"fewer than 8 examples: \{'tiny': 3\}"):
        partition_indices(
            range(23), ["x"] * 23, num_sites=2, spec=parse_partition("column:hospital"), seed=0,
            column_values=hospitals,
        )


def test_repeated_index_is_rejected():
    # Execute / Assert
    with pytest.raises(DataError, match="index 3 appears more than once"):
        partition_indices([1, 2, 3, 3], ["x"] * 10, num_sites=1, spec=IID, seed=0, min_per_site=1)


def test_index_out_of_range_is_rejected():
    # Execute / Assert
    with pytest.raises(DataError, match="index 10 is out of range for 10 labels"):
        partition_indices([0, 10], ["x"] * 10, num_sites=1, spec=IID, seed=0, min_per_site=1)


@pytest.mark.parametrize("num_sites", [0, -2])
def test_num_sites_below_one_is_rejected(num_sites):
    # Execute / Assert
    with pytest.raises(ConfigError, match=f"`num_sites` must be an integer >= 1, got {num_sites}"):
        partition_indices(range(10), ["x"] * 10, num_sites=num_sites, spec=IID, seed=0)


# --- train_val_split -------------------------------------------------------------------------------------


def test_train_val_split_is_disjoint_complete_and_sized_by_fraction():
    # Prepare
    site = list(range(100, 150))

    # Execute
    split = train_val_split(site, val_fraction=0.2, seed=0)

    # Assert
    assert isinstance(split, Split)
    assert len(split.test) == 10
    assert sorted(split.train + split.test) == site
    assert not set(split.train) & set(split.test)


def test_train_val_split_is_deterministic_for_a_seed_and_varies_across_seeds():
    # Execute
    first, again, other = (train_val_split(range(40), val_fraction=0.25, seed=s) for s in (5, 5, 6))

    # Assert
    assert first == again
    assert first.test != other.test


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_train_val_split_rejects_fraction_outside_open_unit_interval(fraction):
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"`val_fraction` must be in \(0, 1\)"):
        train_val_split(range(10), val_fraction=fraction, seed=0)


def test_train_val_split_needs_two_indices():
    # Execute / Assert
    with pytest.raises(ConfigError, match="at least 2 indices"):
        train_val_split([4], val_fraction=0.5, seed=0)
