"""`site prepare`'s rows: read with the training path's reader, normalised, de-identified, deduplicated, written.

See `client/prepare.py` for the order of the steps and why. Rows are numbered as `common.data` numbers
them (1-based data rows of the input).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.errors import ConfigError, DataError

from .near_dup import NearDupIndex, NearDupSettings

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
class Pair:
    """Two rows of the input: ``row`` is near (or equal to) ``kept``, with this Jaccard similarity."""

    row: int
    kept: int
    jaccard: float


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
class Row:
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


def read_rows(path: Path, columns: Columns) -> tuple[list[Row], list[str], dict[str, list[int]], int]:
    """(usable rows, every column, rows dropped by reason, control characters removed)."""
    from fedtune.common.data import MISSING, read_records

    all_columns = list(dict.fromkeys([*_columns_of(path), *columns.wanted]))
    keep_newlines = columns.task == "causal-lm"
    rows: list[Row] = []
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
        rows.append(Row(number, values, fields, label, roles))
    if not number:
        raise DataError(f"{path}: no data rows.")
    return rows, all_columns, dropped, removed


def apply_deid(rows: list[Row], deid: Deidentify) -> dict[str, int]:
    flat = [text for row in rows for text in row.fields]
    redacted, counts = deid(flat)
    if len(redacted) != len(flat):
        raise DataError(f"de-identification returned {len(redacted)} texts for {len(flat)}; it must keep them aligned.")
    it = iter(redacted)
    for row in rows:
        row.fields = [next(it) for _ in row.fields]
    return dict(counts)


def exact_duplicates(rows: list[Row], task: str) -> tuple[list[Row], list[int], list[tuple[int, ...]], list[Pair], int]:
    """(kept rows, exact duplicates, label-conflict groups, duplicate pairs, prompts with several responses)."""
    groups: dict[str, list[Row]] = {}
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


def near_duplicates(rows: list[Row], settings: NearDupSettings) -> tuple[list[Row], list[Pair], list[Pair]]:
    """(kept rows, near duplicates dropped, near pairs with different labels kept), in file order."""
    index = NearDupIndex(settings)
    by_number: dict[int, Row] = {}
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


def token_lengths(rows: list[Row], columns: Columns, tokenizer: Any) -> list[int]:
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


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def encode_rows(rows: list[Row], all_columns: list[str], columns: Columns, suffix: str) -> bytes:
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


def raw_fields(row: Row, columns: Columns) -> list[str]:
    """The row's text fields as read, before normalisation (to count the rows normalisation changed)."""
    if columns.task == "classification":
        return [str(row.values.get(columns.text))]
    if columns.messages:
        turns = _chat(row.values.get(columns.messages)) or []
        return [t for _, t in turns]
    return [str(row.values.get(columns.prompt)), str(row.values.get(columns.response))]
