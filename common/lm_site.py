"""A causal-LM run's examples: the configured file, the simulated split, one site's encoded examples.

The causal-LM counterpart of ``common/sitedata.py``. A simulation holds out a test split no site
sees and cuts the rest into iid site partitions (no labels to stratify or skew by); each site then
keeps a validation split exactly as a classification site does (its own ``val_fraction``, and on a
deployed site its secret seed). Encoding (``common.causal_lm.encode_lm``) may truncate an
example's response or drop an example whose prompt alone fills ``max_length``: a dropped row is
never trained on or validated on, so the privacy ledger keys (``lm_record_digests``) and the
sampling rate q count the rows kept, and the counts go to the site's own log, never on the wire.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import TensorDataset

from .causal_lm import EncodedLM, LMDataSettings, LMTable, encode_lm, lm_record_digests, load_lm_table
from .config import DataConfig
from .errors import DataError
from .partition import holdout_split, parse_partition, partition_indices, train_val_split
from .sitedata import SimulatedSplit, demo_data_path, resolve_data_path

logger = logging.getLogger(__name__)

DEFAULT_LM_DEMO = "clinical_summaries"


def lm_data_settings(data: DataConfig) -> LMDataSettings:
    """The causal-LM columns and template of ``data``."""
    return LMDataSettings(prompt_column=data.prompt_column, response_column=data.response_column,
                          messages_column=data.messages_column, template=data.template)


def resolve_lm_data_path(data: DataConfig) -> Path:
    """The configured file; empty means the packaged generated clinical-summaries demo."""
    return demo_data_path(DEFAULT_LM_DEMO) if not data.path else resolve_data_path(data)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, settings: LMDataSettings, mtime: float) -> LMTable:
    return load_lm_table(path, settings)


def load_config_lm_table(data: DataConfig) -> LMTable:
    """Load the configured causal-LM file once per process (simulated sites share an actor process)."""
    path = resolve_lm_data_path(data)
    mtime = path.stat().st_mtime if path.exists() else 0.0
    return _load_cached(str(path), lm_data_settings(data), mtime)


def simulated_lm_split(table: LMTable, data: DataConfig, *, num_sites: int, seed: int) -> SimulatedSplit:
    """A held-out test split (``data.test_fraction``) and ``num_sites`` iid partitions of the rest."""
    hold = holdout_split(len(table), test_fraction=data.test_fraction, seed=seed)
    # partition_indices reads only the length of its label column for an iid split.
    sites = partition_indices(hold.train, [""] * len(table), num_sites=num_sites, spec=parse_partition("iid"), seed=seed)
    return SimulatedSplit(test=hold.test, sites=sites)


def subset(table: LMTable, indices: Sequence[int], what: str) -> LMTable:
    """The rows ``indices`` of ``table`` in that order; ``what`` names the subset in messages (its
    row numbers count within it)."""
    return LMTable(conversations=[table.conversations[i] for i in indices], source=f"{table.source} ({what})",
                   from_messages=table.from_messages)


@dataclass(frozen=True)
class LMSplit:
    """One site's examples before encoding: what it trains on and what it validates on."""

    train: LMTable
    val: LMTable


def lm_site_split(table: LMTable, indices: list[int], *, val_fraction: float, seed: int, site: str) -> LMSplit:
    """Split a site's rows into train and validation as ``sitedata.site_examples`` does."""
    if val_fraction > 0 and len(indices) >= 2:
        split = train_val_split(indices, val_fraction=val_fraction, seed=seed)
        train, val = split.train, split.test
    else:
        train, val = list(indices), []
    return LMSplit(train=subset(table, train, f"{site} training split"), val=subset(table, val, f"{site} validation split"))


@dataclass(frozen=True, kw_only=True)
class EncodedSite:
    """A site's encoded examples and the ledger's key of every row kept.

    Attributes:
        train: Its training examples (``train.dataset`` is what DP-SGD samples from).
        val: Its validation examples; None when it has none (``val_fraction`` 0, or every
            validation prompt fills ``max_length``).
        train_records / val_records: ``lm_record_digests`` of the kept rows, aligned with the datasets.
    """

    train: EncodedLM
    val: EncodedLM | None
    train_records: list[str]
    val_records: list[str]


def kept_digests(table: LMTable, encoded: EncodedLM) -> list[str]:
    """``lm_record_digests`` of the rows of ``table`` that ``encoded`` kept (aligned with its dataset).

    ``table`` is the one the ledger keys, which may differ from the one encoded (a site that de-identifies
    encodes the redacted rows but keys the rows as stored); the rows are the same either way."""
    dropped = {*encoded.dropped_rows, *encoded.refused_rows}  # 1-based rows of this table, none of them in the dataset
    return [d for row, d in enumerate(lm_record_digests(table), start=1) if row not in dropped]


def encode_site(tokenizer: Any, split: LMSplit, *, max_length: int, template: str, site: str) -> EncodedSite:
    """Encode a site's split; log (site's log only) how many examples were truncated and dropped.

    Raises:
        DataError: when no training example keeps a response token (``encode_lm`` names the fix).
    """
    train = encode_lm(tokenizer, split.train, max_length=max_length, template=template)
    val: EncodedLM | None = None
    if len(split.val):
        try:
            val = encode_lm(tokenizer, split.val, max_length=max_length, template=template)
        except DataError as err:  # no validation example fits: the site validates nothing, it still trains
            logger.warning("%s: no validation example fits model.max_length = %d (%s); it releases no validation statistics",
                           site, max_length, err)
    logger.info(
        "%s: causal-lm examples at max_length %d: training %d kept of %d (%d truncated, %d dropped), "
        "validation %d kept of %d (%d truncated, %d dropped)",
        site, max_length, train.examples, len(split.train), train.truncated, len(train.dropped_rows),
        val.examples if val else 0, len(split.val), val.truncated if val else 0,
        len(val.dropped_rows) if val else len(split.val),
    )
    return EncodedSite(
        train=train, val=val, train_records=kept_digests(split.train, train),
        val_records=kept_digests(split.val, val) if val else [],
    )


def prompt_texts(table: LMTable) -> list[str]:
    """Each example's prompt as ``common.causal_lm.generate`` takes it: one user turn (a chat's last
    user message, its earlier turns left out)."""
    return [next(m.content for m in reversed(conv[:-1]) if m.role == "user") for conv in table.conversations]


def empty_dataset() -> TensorDataset:
    """An encoded split with no example (a site without validation examples releases nothing)."""
    return TensorDataset(*(torch.empty((0, 1), dtype=torch.long) for _ in range(3)))
