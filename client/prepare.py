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
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import statistics
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.common.config import TASK_MAX_LENGTH
from fedtune.common.errors import ConfigError, DataError

from .near_dup import NearDupIndex, NearDupSettings

if TYPE_CHECKING:  # daemon imports nothing of this module; kept out of the import at run time all the same
    from .daemon import SiteConfig

logger = logging.getLogger(__name__)

REPORT_SUFFIX = ".prepare.json"
PLOT_SUFFIX = ".prepare.png"
REPORT_VERSION = 1
TASKS = ("classification", "causal-lm")
SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")  # what common.data reads, and so what prepare writes

# Cc (C0 and C1 controls) are removed after whitespace has been turned into spaces; of the format
# characters (Cf) only those that are invisible and carry no meaning in running text: zero-width space,
# word joiner, byte-order mark, soft hyphen. Others (ZWJ in emoji, bidi marks in Arabic or Hebrew) stay.
_INVISIBLE = {"\u200b", "\u2060", "\ufeff", "\u00ad"}
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")

# A de-identification step: texts in, (redacted texts aligned with them, count per entity type) out.
Deidentify = Callable[[Sequence[str]], tuple[list[str], dict[str, int]]]


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


@dataclass(frozen=True, kw_only=True)
class Columns:
    """Which columns train: ``text`` + ``label`` (classification), or ``prompt`` + ``response``, or ``messages``."""

    task: str
    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {list(TASKS)}, got {self.task!r}.")

    @property
    def wanted(self) -> list[str]:
        if self.task == "classification":
            return [self.text, self.label]
        return [self.messages] if self.messages else [self.prompt, self.response]


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
class Pair:
    """Two rows of the input: ``row`` is near (or equal to) ``kept``, with this Jaccard similarity."""

    row: int
    kept: int
    jaccard: float


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


# ----------------------------------------------------------------------------------------------- text


def normalise(text: str, *, keep_newlines: bool) -> tuple[str, int]:
    """(The normalised text, how many control or invisible characters were removed); see the module docstring."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    if not keep_newlines:
        text = text.replace("\n", " ")
    removed = 0
    kept = []
    for ch in text:
        if ch in "\n\t" or ch.isspace():
            kept.append(ch if ch == "\n" else " ")
        elif unicodedata.category(ch) == "Cc" or ch in _INVISIBLE:
            removed += 1
        else:
            kept.append(ch)
    text = _SPACES.sub(" ", "".join(kept))
    if keep_newlines:
        text = _BLANK_LINES.sub("\n\n", "\n".join(line.strip() for line in text.split("\n")))
    return text.strip(), removed


# ----------------------------------------------------------------------------------------------- rows


@dataclass
class _Row:
    number: int
    values: dict[str, Any]  # every column, as read (the cleaned file writes them back, text fields replaced)
    fields: list[str]  # the normalised texts that train: [text], [prompt, response], or each message's content
    label: str | None = None
    roles: tuple[str, ...] = ()  # causal-lm chats

    def key(self) -> str:
        return json.dumps([self.roles, self.fields], ensure_ascii=False)

    def joined(self) -> str:
        return "\n".join(self.fields)


def _label(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value.strip() else None


def _chat(value: Any) -> list[tuple[str, str]] | None:
    from fedtune.common.causal_lm import ROLES

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, list) or not value:
        return None
    turns = []
    for item in value:
        if not isinstance(item, dict) or item.get("role") not in ROLES or not isinstance(item.get("content"), str):
            return None
        turns.append((str(item["role"]), item["content"]))
    if turns[-1][0] != "assistant" or not any(role == "user" for role, _ in turns[:-1]):
        return None
    return turns


def _columns_of(path: Path) -> list[str]:
    """Every column of the file, in order: the CSV header, the first JSON object's keys, the Parquet schema."""
    from fedtune.common.data import read_records

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except Exception as err:  # pyarrow raises several types; read_records names the problem below
            raise DataError(f"{path}: not a readable Parquet file: {err}.") from None
    if suffix == ".csv":
        import csv

        with open(path, encoding="utf-8-sig", newline="") as f:
            for header in csv.reader(f):
                if any(h.strip() for h in header):
                    return header
        return []
    for _, values in read_records(path, []):  # JSON Lines: the reader checks the file as it goes
        break
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                return list(record) if isinstance(record, dict) else []
    return []


def _read(path: Path, columns: Columns) -> tuple[list[_Row], list[str], dict[str, list[int]], int]:
    """(usable rows, every column, rows dropped by reason, control characters removed)."""
    from fedtune.common.data import MISSING, read_records

    all_columns = list(dict.fromkeys([*_columns_of(path), *columns.wanted]))
    keep_newlines = columns.task == "causal-lm"
    rows: list[_Row] = []
    dropped: dict[str, list[int]] = {"empty": [], "missing_label": [], "unusable": []}
    removed = 0
    number = 0
    for _, values in read_records(path, all_columns):
        number += 1
        values = {k: v for k, v in values.items() if v is not MISSING}
        if columns.task == "causal-lm" and columns.messages:
            turns = _chat(values.get(columns.messages))
            if turns is None:
                dropped["unusable"].append(number)
                continue
            texts = [t for _, t in turns]
            roles = tuple(r for r, _ in turns)
        else:
            names = [columns.text] if columns.task == "classification" else [columns.prompt, columns.response]
            raw = [values.get(n) for n in names]
            if columns.task == "causal-lm" and isinstance(raw[1], int) and not isinstance(raw[1], bool):
                raw[1] = str(raw[1])  # as the training path reads a numeric response
            if any(v is not None and not isinstance(v, str) for v in raw):
                dropped["unusable"].append(number)
                continue
            texts, roles = [v or "" for v in raw], ()
        fields = []
        for text in texts:
            clean, n = normalise(text, keep_newlines=keep_newlines)
            removed += n
            fields.append(clean)
        if not all(fields):
            dropped["empty"].append(number)
            continue
        label = None
        if columns.task == "classification":
            label = _label(values.get(columns.label))
            if label is None:
                dropped["missing_label"].append(number)
                continue
        rows.append(_Row(number, values, fields, label, roles))
    if not number:
        raise DataError(f"{path}: no data rows.")
    return rows, all_columns, dropped, removed


def _apply_deid(rows: list[_Row], deid: Deidentify) -> dict[str, int]:
    flat = [text for row in rows for text in row.fields]
    redacted, counts = deid(flat)
    if len(redacted) != len(flat):
        raise DataError(f"de-identification returned {len(redacted)} texts for {len(flat)}; it must keep them aligned.")
    it = iter(redacted)
    for row in rows:
        row.fields = [next(it) for _ in row.fields]
    return dict(counts)


def _exact(rows: list[_Row], task: str) -> tuple[list[_Row], list[int], list[tuple[int, ...]], list[Pair], int]:
    """(kept rows, exact duplicates, label-conflict groups, duplicate pairs, prompts with several responses)."""
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.fields[0] if task == "classification" else row.key(), []).append(row)
    kept, duplicates, conflicts, pairs = [], [], [], []
    for group in groups.values():
        if len({r.label for r in group}) > 1:
            conflicts.append(tuple(r.number for r in group))
            continue
        kept.append(group[0])
        for r in group[1:]:
            duplicates.append(r.number)
            pairs.append(Pair(r.number, group[0].number, 1.0))
    several = 0
    if task == "causal-lm":
        prompts: dict[str, int] = {}
        for row in kept:
            prompt = json.dumps([row.roles[:-1], row.fields[:-1]], ensure_ascii=False)
            prompts[prompt] = prompts.get(prompt, 0) + 1
        several = sum(1 for n in prompts.values() if n > 1)
    kept.sort(key=lambda r: r.number)
    return kept, sorted(duplicates), sorted(conflicts), pairs, several


def _near(rows: list[_Row], settings: NearDupSettings) -> tuple[list[_Row], list[Pair], list[Pair]]:
    """(kept rows, near duplicates dropped, near pairs with different labels kept), in file order."""
    index = NearDupIndex(settings)
    by_number: dict[int, _Row] = {}
    kept, dropped, other = [], [], []
    for row in rows:
        sketch = index.sketch(row.joined())
        matches = index.query(sketch)
        same = [m for m in matches if by_number[m.key].label == row.label]
        if same:
            dropped.append(Pair(row.number, same[0].key, round(same[0].jaccard, 4)))
            continue
        other += [Pair(row.number, m.key, round(m.jaccard, 4)) for m in matches]
        index.add(row.number, sketch)
        by_number[row.number] = row
        kept.append(row)
    return kept, dropped, other


# ------------------------------------------------------------------------------------------- lengths


def _token_lengths(rows: list[_Row], columns: Columns, tokenizer: Any) -> list[int]:
    if columns.task == "classification":
        ids = tokenizer([r.fields[0] for r in rows], add_special_tokens=True, truncation=False)["input_ids"]
        return [len(x) for x in ids]
    from fedtune.common.causal_lm import ChatMessage, example_ids, use_chat

    chat = use_chat(tokenizer, "auto", needed=bool(columns.messages))
    lengths = []
    for r in rows:
        roles = r.roles or ("user", "assistant")
        prompt, response = example_ids(tokenizer, tuple(ChatMessage(ro, t) for ro, t in zip(roles, r.fields)), chat)
        lengths.append(len(prompt) + len(response))
    return lengths


def _lengths(rows: list[_Row], lengths: list[int], max_length: int, tokenizer_name: str, bins: int) -> Lengths:
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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return FileStamp(str(path), path.suffix.lower().lstrip("."), digest.hexdigest(), path.stat().st_size, rows)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _encode(rows: list[_Row], all_columns: list[str], columns: Columns, suffix: str) -> bytes:
    records = []
    for r in rows:
        values = dict(r.values)
        if columns.task == "classification":
            values[columns.text] = r.fields[0]
        elif columns.messages:
            chat = [{"role": role, "content": text} for role, text in zip(r.roles, r.fields)]
            original = values.get(columns.messages)
            values[columns.messages] = json.dumps(chat, ensure_ascii=False) if isinstance(original, str) else chat
        else:
            values[columns.prompt], values[columns.response] = r.fields
        records.append(values)
    if suffix == ".csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(all_columns)
        for values in records:
            writer.writerow([_cell(values.get(c)) for c in all_columns])
        return buf.getvalue().encode("utf-8")
    if suffix in (".jsonl", ".json"):
        return "".join(json.dumps({c: values[c] for c in all_columns if c in values}, ensure_ascii=False) + "\n"
                       for values in records).encode("utf-8")
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: values.get(c) for c in all_columns} for values in records]) if records else \
        pa.table({c: pa.array([], type=pa.string()) for c in all_columns})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


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
    spent: Callable[[list[_Row]], float] | None = None,
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
        spent: The largest epsilon the input's rows (as read, before normalisation) have already spent
            in the site's ledger; a positive value is a warning in the report.
        overwrite: Replace an existing ``out`` that no earlier prepare wrote.
        plot: Write the PNG.

    Raises:
        DataError: naming the file and row, for what the training path's reader refuses.
        ConfigError: for a bad ``out``.
    """
    from fedtune.common.io import atomic_write_bytes

    source, out = Path(source), Path(out)
    if source.suffix.lower() not in SUFFIXES:
        raise DataError(f"{source}: unsupported file type {source.suffix!r}; use one of {list(SUFFIXES)}.")
    _check_out(source, out, overwrite)
    before = file_stamp(source, 0) if source.is_file() else None
    rows, all_columns, reasons, removed = _read(source, columns)
    total = len(rows) + sum(len(v) for v in reasons.values())
    normalised = sum(1 for r in rows if r.fields != _raw_fields(r, columns))
    warnings = []
    if spent is not None:
        eps = spent(rows)
        if eps > 0:
            warnings.append(f"rows of this file have already spent epsilon {eps:.3f} in the site's privacy ledger; rows "
                            "that prepare changes (normalised, redacted) are new records to the ledger, with a fresh "
                            "budget: prepare data before its first training run.")
    deid_counts: dict[str, int] = _apply_deid(rows, deid) if deid is not None else {}
    labels_before = _counts(r.label for r in rows) if columns.task == "classification" else {}
    kept, duplicates, conflicts, pairs, several = _exact(rows, columns.task)
    kept, near, other = _near(kept, settings.near_dup)
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
    lengths = _lengths(kept, _token_lengths(kept, columns, tokenizer) if kept else [], max_length, tokenizer_name,
                       settings.histogram_bins)
    if not kept:
        warnings.append("no row is left to train on.")
    data = _encode(kept, all_columns, columns, out.suffix.lower())
    if before is not None and file_stamp(source, 0).sha256 != before.sha256:
        raise DataError(f"{source} changed while prepare read it; run prepare again.")
    atomic_write_bytes(out, data)
    report = PrepareReport(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        task=columns.task, settings=settings,
        input=dataclasses.replace(before or file_stamp(source, 0), rows=total),
        output=file_stamp(out, len(kept)),
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


def _raw_fields(row: _Row, columns: Columns) -> list[str]:
    if columns.task == "classification":
        return [str(row.values.get(columns.text))]
    if columns.messages:
        turns = _chat(row.values.get(columns.messages)) or []
        return [t for _, t in turns]
    return [str(row.values.get(columns.prompt)), str(row.values.get(columns.response))]


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


def prepare_site(
    site: SiteConfig, *, data: Path | None = None, out: Path | None = None, task: str | None = None,
    settings: PrepareSettings = PrepareSettings(), overwrite: bool = False, plot: bool = True,
) -> PrepareResult:
    """`fedtune site prepare`: clean the site's data file (``data``: another file) into ``out``.

    ``site`` is the site's `SiteConfig`; its base model's tokenizer measures lengths, its ledger is
    asked whether the input's rows already spent budget, and ``[deid]`` turns redaction on.
    """
    from fedtune.common.config import ModelConfig
    from fedtune.common.data import record_digests

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

    def spent(rows: list[_Row]) -> float:
        from .ledger import PrivacyLedger

        ledger = PrivacyLedger(site.state_dir)
        if not ledger.path.exists():
            return 0.0
        if task == "classification":
            digests = record_digests([str(r.values.get(columns.text)) for r in rows], [str(r.label) for r in rows])
        elif not columns.messages:
            digests = record_digests([str(r.values.get(columns.prompt)) for r in rows],
                                     [str(r.values.get(columns.response)) for r in rows])
        else:
            return 0.0  # chats are keyed by their parsed turns (common.causal_lm.lm_record_digests); not re-derived here
        return ledger.spent_epsilon(digests, delta=site.delta)

    return prepare_file(source, Path(out) if out is not None else default_out(source), columns, tokenizer=tokenizer,
                        tokenizer_name=name, settings=settings, deid=_site_deid(site), spent=spent,
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
