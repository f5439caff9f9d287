"""Which examples a site trains and validates on, in simulation and in deployment.

Simulation: one table is split (seeded) into a held-out test set that no site sees and one
partition per simulated site. Deployment: the site's own file is all its data. Either way the
site then keeps a validation split for federated evaluation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .config import DataConfig
from .data import TextTable, label_set, load_table
from .errors import ConfigError
from .partition import holdout_split, parse_partition, partition_indices, train_val_split

DEMO_DATASETS = ("clinical_triage", "bank_intents", "clinical_summaries")  # the last is causal-lm (prompt, response)
# Natural partition column of each packaged demo file.
DEMO_SITE_COLUMNS = {"clinical_triage": "hospital", "bank_intents": "branch"}


def demo_data_path(name: str = "clinical_triage") -> Path:
    """Path of a packaged demo dataset (generated; see ``common/demo_data/README.md``)."""
    if name not in DEMO_DATASETS:
        raise ConfigError(f"unknown demo dataset {name!r}; choose one of {list(DEMO_DATASETS)}.")
    return Path(str(resources.files("fedtune.common") / "demo_data" / f"{name}.csv"))


def resolve_data_path(data: DataConfig) -> Path:
    """The configured data file; empty means the packaged clinical demo, 'demo:NAME' another demo."""
    if not data.path:
        return demo_data_path()
    if data.path.startswith("demo:"):
        return demo_data_path(data.path.removeprefix("demo:"))
    return Path(data.path)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, text_column: str, label_column: str, extra: tuple[str, ...], mtime: float) -> TextTable:
    return load_table(path, text_column=text_column, label_column=label_column, extra_columns=extra)


def load_config_table(data: DataConfig) -> TextTable:
    """Load the configured table once per process (simulated sites share an actor process)."""
    path = resolve_data_path(data)
    spec = parse_partition(data.partition)
    extra = (spec.column,) if spec.kind == "column" and spec.column else ()
    mtime = path.stat().st_mtime if path.exists() else 0.0
    return _load_cached(str(path), data.text_column, data.label_column, extra, mtime)


def run_labels(data: DataConfig, table: TextTable | None = None) -> list[str]:
    """The run's label set: configured, or the sorted labels of the table."""
    if data.labels:
        return list(data.labels)
    return label_set((table or load_config_table(data)).labels)


@dataclass(frozen=True)
class SimulatedSplit:
    """Index lists into one table: a held-out test set and one partition per site."""

    test: list[int]
    sites: list[list[int]]


def simulated_split(table: TextTable, data: DataConfig, *, num_sites: int, seed: int) -> SimulatedSplit:
    hold = holdout_split(len(table.labels), test_fraction=data.test_fraction, seed=seed, labels=table.labels)
    spec = parse_partition(data.partition)
    column = table.columns.get(spec.column) if spec.column else None
    sites = partition_indices(hold.train, table.labels, num_sites=num_sites, spec=spec, seed=seed, column_values=column)
    return SimulatedSplit(test=hold.test, sites=sites)


@dataclass(frozen=True)
class SiteExamples:
    """One site's examples: what it trains on and what it validates on."""

    train_texts: list[str]
    train_labels: list[str]
    val_texts: list[str]
    val_labels: list[str]


def site_examples(table: TextTable, indices: list[int], *, val_fraction: float, seed: int) -> SiteExamples:
    if val_fraction > 0 and len(indices) >= 2:
        split = train_val_split(indices, val_fraction=val_fraction, seed=seed)
        train, val = split.train, split.test
    else:
        train, val = list(indices), []
    return SiteExamples(
        train_texts=[table.texts[i] for i in train],
        train_labels=[table.labels[i] for i in train],
        val_texts=[table.texts[i] for i in val],
        val_labels=[table.labels[i] for i in val],
    )
