"""`fedtune site prepare`: clean a site's data file where it lives, and say what was done.

The pipeline, in order (each step's counts go to the report, with row numbers, never text):
1. Read every record with the training path's reader (`common.data.read_records`: CSV, JSON Lines,
   Parquet; the same encoding, size and format rules). Rows are the 1-based data rows of the input.
2. Normalise each text field: Unicode NFC; control characters and invisible format characters
   (zero-width space, word joiner, byte-order mark) removed; runs of whitespace one space, stripped.
   Classification texts become one line: a line break in a note carries nothing a label depends on,
   and the tokenizer reads it as a space anyway. Causal-LM prompts and responses keep their line
   breaks (CRLF -> LF, spaces collapsed within each line, at most one blank line in a row), because
   a response's layout (a list, paragraphs) is what the model learns to write, and a prompt is
   served as it is written, so training on a flattened one would not match what it is later asked.
3. Drop rows left empty (or without a label), and rows that cannot train (a value of the wrong type,
   a chat that is not a list of {role, content} ending with the answer).
4. De-identify, when the site enables it (``[deid]``): redaction comes before deduplication, so two
   rows that differ only in a phone number are found as duplicates.
5. Exact duplicates (after normalisation): the first row is kept. Classification rows with the same
   text and different labels are *all* dropped as label conflicts: which label is right cannot be
   known here, and keeping one would train the model on a guess; the report names the rows so the
   site's experts can fix the labels and run prepare again.
6. Near duplicates (`client/near_dup.py`): a row whose text is near one already kept *with the same
   label* is dropped. A near pair with different labels is kept and listed for review: one word
   ("left" / "right", "no" / "new") can be exactly what decides the label.
7. Report label balance, rare labels, short texts and token lengths against the model's max length.

The input file is never written: the cleaned rows go to a new file (refused if it is the input),
written atomically, and the report beside it.

Privacy ledger. A row that prepare changes, or keeps in place of its duplicates, is a new record to
the site's ledger (it keys records by content). Before the cleaned file is written, prepare links
each such record to the input records it came from (`client/prepare_lineage.py`,
`PrivacyLedger.link`), so the cleaned rows carry the spend of the rows they came from, in every
budget check after; a crash between the two leaves links to records nothing holds, which cost nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.common.config import TASK_MAX_LENGTH
from fedtune.common.errors import ConfigError, DataError

from .near_dup import NearDupSettings
from .prepare_rows import (
    SUFFIXES,
    TASKS,
    Columns,
    Deidentify,
    Pair,
    Row,
    apply_deid,
    encode_rows,
    exact_duplicates,
    near_duplicates,
    normalise,
    raw_fields,
    read_rows,
    token_lengths,
)

if TYPE_CHECKING:  # daemon imports nothing of this module; kept out of the import at run time all the same
    from .daemon import SiteConfig
    from .ledger import PrivacyLedger

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "SUFFIXES", "Columns", "Pair", "PrepareSettings", "PrepareReport", "PrepareResult", "normalise",
           "prepare_file", "prepare_site_data", "default_out", "report_path", "report_warning", "file_stamp"]

REPORT_SUFFIX = ".prepare.json"
PLOT_SUFFIX = ".prepare.png"
REPORT_VERSION = 1

@dataclass(frozen=True, kw_only=True)
class PrepareSettings:
    """What `site prepare` drops and flags.

    Attributes:
        near_dup: How near a near duplicate is (`NearDupSettings`).
        min_words: A text (classification) or response (causal-lm) with fewer words is flagged as
            suspiciously short (kept).
        rare_label_share: A label with fewer than this share of the kept rows is flagged as rare.
        rare_label_rows: A label with fewer kept rows than this is flagged as rare, whatever its share.
        max_length: Tokens per example that the run trains on; 0: the task's default (`TASK_MAX_LENGTH`).
        histogram_bins: Bars of the token-length histogram.
    """

    near_dup: NearDupSettings = field(default_factory=NearDupSettings)
    min_words: int = 3
    rare_label_share: float = 0.01
    rare_label_rows: int = 10
    max_length: int = 0
    histogram_bins: int = 20

    def __post_init__(self) -> None:
        problems = []
        if self.min_words < 0:
            problems.append(f"prepare min_words must be >= 0, got {self.min_words!r}.")
        if not 0.0 <= self.rare_label_share < 1.0:
            problems.append(f"prepare rare_label_share must be in [0, 1), got {self.rare_label_share!r}.")
        if self.rare_label_rows < 0:
            problems.append(f"prepare rare_label_rows must be >= 0, got {self.rare_label_rows!r}.")
        if self.max_length and not 2 <= self.max_length <= 65536:
            problems.append(f"--max-length must be in [2, 65536] (0: the task's default), got {self.max_length!r}.")
        if not 1 <= self.histogram_bins <= 200:
            problems.append(f"prepare histogram_bins must be in [1, 200], got {self.histogram_bins!r}.")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class FileStamp:
    """A file as it was when the report was written: site check compares ``sha256`` and ``size``."""

    path: str
    format: str
    sha256: str
    size: int
    rows: int


@dataclass(frozen=True)
class Dropped:
    """Rows left out of the cleaned file, by reason (1-based data rows of the input)."""

    empty: tuple[int, ...] = ()
    missing_label: tuple[int, ...] = ()
    unusable: tuple[int, ...] = ()
    exact_duplicate: tuple[int, ...] = ()
    label_conflict: tuple[int, ...] = ()
    near_duplicate: tuple[int, ...] = ()

    def counts(self) -> dict[str, int]:
        return {f.name: len(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def total(self) -> int:
        return sum(self.counts().values())


@dataclass(frozen=True)
class Lengths:
    """Tokens per kept example, with the base model's tokenizer, against ``max_length``."""

    tokenizer: str
    max_length: int
    median: float
    p95: int
    max: int
    truncated: int
    truncated_rows: tuple[int, ...]
    bin_edges: tuple[float, ...]
    bin_counts: tuple[int, ...]


@dataclass(frozen=True)
class DeidSummary:
    enabled: bool
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class PrepareReport:
    """What `site prepare` did to one file: counts and row numbers only, never a text.

    It may be shown to people who must not see the data (the coordinator's operators, by mistake):
    labels (the site's published class names) and row numbers are the most it names.
    """

    version: int = REPORT_VERSION
    created: str
    task: str
    rows: str = "1-based data rows of the input file (header excluded, blank lines skipped)"
    settings: PrepareSettings
    input: FileStamp
    output: FileStamp
    normalised: int
    control_chars_removed: int
    dropped: Dropped
    duplicates_of: tuple[Pair, ...]
    label_conflicts: tuple[tuple[int, ...], ...]
    near_pairs_with_other_labels: tuple[Pair, ...]
    prompts_with_several_responses: int
    labels_before: dict[str, int]
    labels_after: dict[str, int]
    rare_labels: dict[str, tuple[int, ...]]
    short_rows: tuple[int, ...]
    lengths: Lengths
    deid: DeidSummary
    warnings: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class PrepareResult:
    report: PrepareReport
    out: Path
    report_path: Path
    plot_path: Path | None


# ------------------------------------------------------------------------------------------- lengths


def _lengths(rows: list[Row], lengths: list[int], max_length: int, tokenizer_name: str, bins: int) -> Lengths:
    import numpy as np

    if not lengths:
        return Lengths(tokenizer_name, max_length, 0.0, 0, 0, 0, (), (), ())
    ordered = sorted(lengths)
    top = max(ordered[-1], max_length) + 1
    counts, edges = np.histogram(lengths, bins=bins, range=(0, top))
    truncated = tuple(r.number for r, n in zip(rows, lengths) if n > max_length)
    return Lengths(tokenizer_name, max_length, float(statistics.median(lengths)), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
                   ordered[-1], len(truncated), truncated, tuple(round(float(e), 3) for e in edges), tuple(int(c) for c in counts))


# ------------------------------------------------------------------------------------------- writing


def file_stamp(path: Path, rows: int) -> FileStamp:
    """sha256 and size of ``path``, read in blocks."""
    from fedtune.common.io import file_sha256

    return FileStamp(str(path), path.suffix.lower().lstrip("."), file_sha256(path), path.stat().st_size, rows)


def default_out(data: Path) -> Path:
    """Where the cleaned copy of ``data`` goes by default: ``notes.csv`` -> ``notes.clean.csv``."""
    return data.with_name(f"{data.stem}.clean{data.suffix}")


def report_path(out: Path) -> Path:
    return out.with_name(out.name + REPORT_SUFFIX)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_out(source: Path, out: Path, overwrite: bool) -> None:
    if out.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"--out {out}: unsupported file type {out.suffix!r}; use one of {list(SUFFIXES)}.")
    for path in (out, report_path(out), out.with_name(out.name + PLOT_SUFFIX)):
        if path.resolve() == source.resolve() or _same_file(path, source):
            raise ConfigError(f"--out {out} would overwrite the input {source} ({path}); prepare never modifies its input: "
                              "choose another --out.")
    if out.exists() and not overwrite and not report_path(out).exists():
        raise ConfigError(f"--out {out} already exists and is not the output of an earlier `site prepare` "
                          f"(no {report_path(out).name} beside it); choose another --out or pass --overwrite.")


# ------------------------------------------------------------------------------------------ pipeline


def prepare_file(
    source: Path,
    out: Path,
    columns: Columns,
    *,
    tokenizer: Any,
    tokenizer_name: str,
    settings: PrepareSettings = PrepareSettings(),
    deid: Deidentify | None = None,
    ledger: PrivacyLedger | None = None,
    delta: float | None = None,
    overwrite: bool = False,
    plot: bool = True,
) -> PrepareResult:
    """Clean ``source`` into ``out`` and write ``<out>.prepare.json`` (and ``.prepare.png``) beside it.

    Args:
        source: The site's data file (CSV, JSON Lines, Parquet); never written.
        out: The cleaned file; its suffix picks the format. Refused if it (or the report or plot) is ``source``.
        columns: The task and its columns.
        tokenizer: The base model's tokenizer (token lengths against ``settings.max_length``).
        tokenizer_name: What the report names as the tokenizer (the model folder).
        settings: Thresholds.
        deid: The site's de-identification step, or None when ``[deid]`` is off.
        ledger: The site's privacy ledger: each cleaned record that is not simply its input row is
            linked in it to the input records it came from, before the cleaned file is written (see
            the module docstring); None: no ledger (a file that no site trains on yet).
        delta: The site's delta, at which the report states what the input's rows already spent
            (required with ``ledger``).
        overwrite: Replace an existing ``out`` that no earlier prepare wrote.
        plot: Write the PNG.

    Raises:
        DataError: naming the file and row, for what the training path's reader refuses.
        ConfigError: for a bad ``out``.
    """
    from fedtune.common.io import atomic_write_bytes

    source, out = Path(source), Path(out)
    if ledger is not None and delta is None:
        raise ConfigError("prepare_file: `delta` is required with `ledger` (the site's [privacy] delta).")
    if source.suffix.lower() not in SUFFIXES:
        raise DataError(f"{source}: unsupported file type {source.suffix!r}; use one of {list(SUFFIXES)}.")
    _check_out(source, out, overwrite)
    before = file_stamp(source, 0) if source.is_file() else None
    rows, all_columns, reasons, removed = read_rows(source, columns)
    total = len(rows) + sum(len(v) for v in reasons.values())
    normalised = sum(1 for r in rows if r.fields != raw_fields(r, columns))
    warnings = []
    usable = list(rows)  # before deduplication: every row a cleaned one may come from
    deid_counts: dict[str, int] = apply_deid(rows, deid) if deid is not None else {}
    labels_before = _counts(r.label for r in rows) if columns.task == "classification" else {}
    kept, duplicates, conflicts, pairs, several = exact_duplicates(rows, columns.task)
    kept, near, other = near_duplicates(kept, settings.near_dup)
    dropped = Dropped(empty=tuple(reasons["empty"]), missing_label=tuple(reasons["missing_label"]),
                      unusable=tuple(reasons["unusable"]), exact_duplicate=tuple(duplicates),
                      label_conflict=tuple(n for g in conflicts for n in g), near_duplicate=tuple(p.row for p in near))
    labels_after = _counts(r.label for r in kept) if columns.task == "classification" else {}
    rare: dict[str, tuple[int, ...]] = {}
    for label, n in labels_after.items():
        if n < settings.rare_label_rows or n < settings.rare_label_share * len(kept):
            rare[label] = tuple(r.number for r in kept if r.label == label)
    short = tuple(r.number for r in kept if len(r.fields[-1].split()) < settings.min_words)
    max_length = settings.max_length or TASK_MAX_LENGTH[columns.task]
    lengths = _lengths(kept, token_lengths(kept, columns, tokenizer) if kept else [], max_length, tokenizer_name,
                       settings.histogram_bins)
    if not kept:
        warnings.append("no row is left to train on.")
    data = encode_rows(kept, all_columns, columns, out.suffix.lower())
    if before is not None and file_stamp(source, 0).sha256 != before.sha256:
        raise DataError(f"{source} changed while prepare read it; run prepare again.")
    if ledger is not None and delta is not None:
        warnings += _link_in_ledger(ledger, delta, usable, kept, [*pairs, *near], columns, f"{source.name} -> {out.name}")
    atomic_write_bytes(out, data)
    report = PrepareReport(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        task=columns.task, settings=settings,
        input=dataclasses.replace(before or file_stamp(source, 0), rows=total),
        # The bytes just written, hashed in memory rather than read back.
        output=FileStamp(str(out), out.suffix.lower().lstrip("."), hashlib.sha256(data).hexdigest(), len(data), len(kept)),
        normalised=normalised, control_chars_removed=removed, dropped=dropped,
        duplicates_of=tuple(sorted(pairs + near, key=lambda p: p.row)), label_conflicts=tuple(conflicts),
        near_pairs_with_other_labels=tuple(other), prompts_with_several_responses=several,
        labels_before=labels_before, labels_after=labels_after, rare_labels=rare, short_rows=short, lengths=lengths,
        deid=DeidSummary(enabled=deid is not None, counts=deid_counts), warnings=tuple(warnings),
    )
    rpath = report_path(out)
    atomic_write_bytes(rpath, report.to_json().encode("utf-8"))
    plot_path = None
    if plot:
        from .prepare_report import write_plot

        plot_path = out.with_name(out.name + PLOT_SUFFIX)
        write_plot(report, plot_path)
    logger.info("prepare: %d of %d rows kept from %s into %s", len(kept), total, source, out)
    return PrepareResult(report, out, rpath, plot_path)


def _link_in_ledger(ledger: PrivacyLedger, delta: float, rows: list[Row], kept: list[Row], duplicates: list[Pair],
                    columns: Columns, what: str) -> list[str]:
    """Link the cleaned records to their input records in ``ledger``; the report's warning when they had spent."""
    from .prepare_lineage import row_digests, sources_of

    links = sources_of(rows, kept, duplicates, columns)
    # One read of the ledger serves both: the spend is that of the ledger as the link left it (no ledger: none).
    _, eps = ledger.link_and_spent(links, row_digests(rows, columns, cleaned=False), what=f"site prepare {what}", delta=delta)
    if eps <= 0:
        return []
    kept_spend = (f"the {len(links)} cleaned rows that prepare changed or kept in place of duplicates are linked there to the "
                  "rows they came from, and keep their spend." if links else "prepare changed no row, so every row keeps its spend.")
    return [f"rows of this file have already spent epsilon {eps:.3f} (delta {delta:g}) in the site's privacy ledger; " + kept_spend]


def _counts(labels: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------- site entry


def site_task(site: SiteConfig, task: str | None) -> str:
    """The task to prepare for: ``task`` if given (it must be allowed), else the one the policy allows."""
    allowed = tuple(site.policy.allowed_tasks)
    if task is not None:
        if task not in allowed:
            raise ConfigError(f"--task {task} is not allowed by this site's [policy] allowed_tasks {list(allowed)}.")
        return task
    if len(allowed) != 1:
        raise ConfigError(f"this site allows the tasks {list(allowed)}; pass --task to say which columns to prepare.")
    return allowed[0]


def _site_deid(site: SiteConfig) -> Deidentify | None:
    """The site's de-identification (`client/deid.py`) when its site.toml has ``[deid] enabled = true``."""
    if not site.deid.enabled:
        return None
    from .deid import deidentify

    def run(texts: Sequence[str]) -> tuple[list[str], dict[str, int]]:
        result = deidentify(texts, site.deid)
        return list(result.texts), dict(result.counts)

    return run


def prepare_site_data(
    site: SiteConfig, *, data: Path | None = None, out: Path | None = None, task: str | None = None,
    settings: PrepareSettings = PrepareSettings(), overwrite: bool = False, plot: bool = True,
) -> PrepareResult:
    """`fedtune site prepare`: clean the site's data file (``data``: another file) into ``out``.

    ``site`` is the site's `SiteConfig`; its base model's tokenizer measures lengths, its ledger
    links the cleaned rows to the rows they came from (and says what those spent), and ``[deid]``
    turns redaction on.
    """
    from fedtune.common.config import ModelConfig

    source = Path(data) if data is not None else Path(site.data_path)
    where = f"--in {source}" if data is not None else f"data.path {source}"
    if not source.is_file():
        raise DataError(f"{where}: {'not a file' if source.exists() else 'no such file'}.")
    if source.suffix.lower() not in SUFFIXES:
        raise DataError(f"{where}: unsupported file type {source.suffix!r}; use one of {list(SUFFIXES)}.")
    task = site_task(site, task)
    columns = Columns(task=task, text=site.text_column, label=site.label_column, prompt=site.prompt_column,
                      response=site.response_column, messages=site.messages_column)
    model = ModelConfig(base_model=str(site.base_model or ""))
    if task == "classification":
        from fedtune.common.model import load_tokenizer, resolve_base_model

        name, tokenizer = str(resolve_base_model(model, task)), load_tokenizer(model, task)
    else:
        from fedtune.common.causal_lm import load_lm_tokenizer
        from fedtune.common.model import resolve_base_model

        path = resolve_base_model(model, task)
        name, tokenizer = str(path), load_lm_tokenizer(path)

    from .ledger import PrivacyLedger

    return prepare_file(source, Path(out) if out is not None else default_out(source), columns, tokenizer=tokenizer,
                        tokenizer_name=name, settings=settings, deid=_site_deid(site),
                        ledger=PrivacyLedger(site.state_dir), delta=site.delta,
                        overwrite=overwrite, plot=plot)


# ------------------------------------------------------------------------------------------ site check


def read_report(path: Path) -> Mapping[str, Any]:
    """The JSON of a prepare report; ConfigError names the file when it is unreadable."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable prepare report: {err}.") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), dict) for k in ("input", "output")):
        raise ConfigError(f"{path} is not a prepare report (no input and output stamps).")
    return doc


def report_warning(data: Path) -> tuple[Path | None, str | None]:
    """For `site check`: the prepare report that covers ``data`` and a warning when ``data`` changed since.

    ``data`` is either a cleaned file (its report is ``<data>.prepare.json``) or the raw file of the
    default ``--out`` (``<stem>.clean<suffix>.prepare.json``). Returns (report or None, warning or None).
    """
    for path, side in ((report_path(data), "output"), (report_path(default_out(data)), "input")):
        if not path.is_file():
            continue
        doc = read_report(path)
        stamp = doc[side]
        if not data.is_file():
            return path, None
        size = data.stat().st_size
        changed = size != stamp.get("size") or file_stamp(data, 0).sha256 != stamp.get("sha256")
        if changed:
            what = "the cleaned file" if side == "output" else "the raw file"
            return path, (f"{data} ({what}) changed since `site prepare` wrote {path.name} at {doc.get('created')} "
                          f"(size {stamp.get('size')} -> {size} bytes, sha256 differs); run `fedtune site prepare` again.")
        if side == "input":
            return path, (f"{data} is the raw file; `site prepare` wrote its cleaned copy {doc['output'].get('path')}: "
                          "point [data] path at it to train on the cleaned rows.")
        return path, None
    return None, None
