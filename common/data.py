"""A site's local labeled text data: load CSV, JSON Lines or Parquet into a `TextTable`, check labels, fingerprint,
digest each record (the privacy ledger's key).

Row numbers. Every message names the file and a 1-based *data row*: the n-th record, header excluded for CSV,
blank lines skipped. It equals the table index + 1, so `load_table` and `check_labels` count alike. For CSV
and JSON Lines the physical line where the record starts is named too ("row 3 (line 5)"), because a quoted
CSV field may span lines and a blank line shifts the count; that is the number an editor shows.

Encoding. Files are UTF-8; a leading byte-order mark is dropped (spreadsheet exports add one, and left in it
would rename the first column), line endings may be LF or CRLF, and a quoted CSV field keeps its line breaks.
Bytes that are not UTF-8 (a file partly saved as Latin-1 or Windows-1252) are refused, naming the line and
byte offset of the first one, rather than decoded by a guess: a guessed character changes the text, and
with it the record's digest under which the privacy ledger counts its spend, so re-saving the file
correctly later would make the same person's record a new one with a fresh budget.

Size. Files are read a record at a time, and a record (a CSV row with its quoted line breaks, a JSON line,
a Parquet value) longer than `MAX_RECORD_CHARS` is refused, naming the file and row, after reading at most
that much of it: a file with one gigabyte-long row (a missing closing quote, a file without line breaks)
never gets into memory whole.

Reporting without quoting. The loaders stop at the first bad row with a message that quotes its value (the
operator's own log, where the value helps). Given a ``problems`` list they instead collect every bad row as a
`RowProblem` (where and why, never the value) and go on: ``fedtune site check`` prints those, and it must never
print training text. Both modes apply the same rules, so site check refuses exactly the rows training refuses.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.common.errors import ConfigError, DataError, LabelsMismatchError

logger = logging.getLogger(__name__)

MAX_RECORD_CHARS = 1 << 20
"""The longest record a data file may hold, in characters (1 MiB of plain text), line breaks included.

About 150,000 words: far more than a model reads of one text (``model.max_length`` tokens), so no
useful record is refused, while a malformed one is refused after reading at most this much of it.
Read at each load, so a site that truly needs longer records may raise it before loading."""

# A record as a reader yields it: where it is (for messages) and the raw value of each wanted column.
_Record = tuple[str, dict[str, Any]]
# Marks a column absent from one JSON object, which is not the same as a JSON null.
MISSING: Any = object()
_UTF8_HINT = ("files exported as Latin-1 or Windows-1252 must be re-saved as UTF-8, e.g. "
              "`iconv -f WINDOWS-1252 -t UTF-8 FILE > FILE.utf8` (fedtune does not guess encodings; see common/data.py)")


@dataclass(frozen=True)
class RowProblem:
    """One row a loader refuses, described without its value (see the module docstring).

    Attributes:
        where: The file and row, as messages name it ("notes.csv row 3 (line 5)").
        column: The column at fault.
        reason: Why, never quoting the value: "holds list, not text".
        blank: The value is missing, null or blank (as opposed to present but unusable).
    """

    where: str
    column: str
    reason: str
    blank: bool = False


@dataclass(frozen=True)
class TextTable:
    """Texts and their labels, row-aligned, as loaded from one file.

    Attributes:
        texts: One non-blank text per row, exactly as stored (not stripped).
        labels: One label per row, kept exactly as stored: 'cardio ' and 'cardio' are different labels.
        source: The path the table was loaded from, as given; used in messages.
        columns: Any extra requested columns, row-aligned, as strings (e.g. a hospital id for a natural
            partition).
    """

    texts: list[str]
    labels: list[str]
    source: str
    columns: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {"labels": len(self.labels)} | {f"column {k!r}": len(v) for k, v in self.columns.items()}
        wrong = {name: n for name, n in lengths.items() if n != len(self.texts)}
        if wrong:
            raise DataError(
                f"{self.source}: {len(self.texts)} texts but {wrong}; every column needs one value per row."
            )

    def __len__(self) -> int:
        return len(self.texts)


def load_table(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    extra_columns: Sequence[str] = (),
    problems: list[RowProblem] | None = None,
) -> TextTable:
    """Load a site's labeled texts from `.csv`, `.jsonl`/`.json` (JSON Lines) or `.parquet`.

    Files must be UTF-8 (a leading byte-order mark is allowed). CSV needs a header row naming the columns;
    JSON Lines needs one object per line (blank lines are skipped); in JSON Lines and Parquet, integer labels
    and extra values become strings. Rows are numbered as the module docstring describes.

    Args:
        path: The data file; its suffix picks the format (case-insensitive).
        text_column: Column holding the text. Every text must be non-blank.
        label_column: Column holding the label. A label is kept exactly as stored; an empty or
            whitespace-only label counts as missing.
        extra_columns: More columns to keep as strings in `TextTable.columns`, with the same rules as labels.
        problems: If given, a bad row (blank text, missing label, wrong type) is appended to it as a `RowProblem`
            (one per row: its first bad column) and left out of the table, instead of raising; what makes the whole
            file unreadable (see Raises) still raises.

    Returns:
        The table, with `source` set to `str(path)`.

    Raises:
        DataError: naming the file, and the row and value where one applies, for a missing file, an
            unsupported suffix, a missing column, no data rows, a blank text, a missing label or extra value,
            bytes that are not UTF-8, a malformed JSON line or CSV record, or an unreadable Parquet file.
    """
    path = Path(path)
    texts: list[str] = []
    labels: list[str] = []
    extras: dict[str, list[str]] = {name: [] for name in extra_columns}
    refused = 0
    columns = [text_column, label_column, *extras]
    for where, values in read_records(path, columns):
        row: list[str] = []
        for i, column in enumerate(columns):
            try:
                row.append((_as_text if i == 0 else _as_value)(values[column], where, column))
            except DataError:
                if problems is None:
                    raise
                problems.append(_unquoted(where, column, values[column]))
                refused += 1
                break
        else:
            texts.append(row[0])
            labels.append(row[1])
            for name, value in zip(extras, row[2:]):
                extras[name].append(value)
    if not texts and not refused:
        raise DataError(f"{path}: no data rows; expected one row per labeled text.")
    logger.debug("Loaded %d rows with %d distinct labels from %s", len(texts), len(set(labels)), path)
    return TextTable(texts=texts, labels=labels, source=str(path), columns=extras)


def read_records(path: str | Path, columns: Sequence[str]) -> Iterator[_Record]:
    """The records of a `.csv`, `.jsonl`/`.json` or `.parquet` file, one at a time, as read for training.

    Each is ``(where, values)``: where it is, for messages ("notes.csv row 3 (line 5)", see the module
    docstring), and the raw value of each of ``columns`` (`MISSING` where a JSON object lacks the field).
    The suffix and the file are checked before this returns; the records, as they are read.

    Raises:
        DataError: naming the file, for an unsupported suffix, a missing file, a missing column, or any
            record `load_table` would refuse as unreadable (encoding, size, malformed CSV/JSON/Parquet).
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_READERS)}.")
    if not path.is_file():
        raise DataError(f"{path}: {'not a file' if path.exists() else 'no such file'}.")
    return reader(path, list(dict.fromkeys(columns)))


def check_labels(table: TextTable, allowed: Sequence[str]) -> None:
    """Check that every label in `table` is one of `allowed`, compared exactly (no stripping or case folding).

    Raises:
        DataError: naming the first offending row and label, and how many rows in total are affected.
        ConfigError: if `allowed` is empty.
    """
    allowed_set = set(allowed)
    if not allowed_set:
        raise ConfigError("The allowed labels must not be empty; list the classes the model predicts.")
    bad_rows = [i for i, label in enumerate(table.labels) if label not in allowed_set]
    if not bad_rows:
        return
    first = bad_rows[0]
    unknown = label_set(table.labels[i] for i in bad_rows)
    shown = f"{unknown[:10]!r}" + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
    raise LabelsMismatchError(
        f"{table.source} row {first + 1}: label {table.labels[first]!r} is not one of {list(allowed)!r}; "
        f"{len(bad_rows)} of {len(table)} rows have labels outside that set: {shown}."
    )


def label_set(labels: Iterable[str]) -> list[str]:
    """The distinct labels, sorted; the class order used for label ids."""
    return sorted(set(labels))


def fingerprint(table: TextTable) -> str:
    """A stable sha256 hex digest of the table's (text, label) rows, to key a privacy ledger per dataset.

    Order-insensitive on purpose: it digests the sorted multiset of per-row digests, so reordering rows or
    re-saving the file in another format keeps the key (and the privacy budget already spent), while any
    change to a text or label, or adding or removing a row (duplicates count), gives a new key. The source
    path and extra columns are not part of it: moving a file must not reset its budget. Built only from
    hashlib over length-prefixed UTF-8, so it is the same in every process (unlike `hash()`).
    """
    row_digests = sorted(
        hashlib.sha256(_framed(text) + _framed(label)).digest() for text, label in zip(table.texts, table.labels)
    )
    digest = hashlib.sha256(b"fedtune.TextTable.v1\0")
    digest.update(len(row_digests).to_bytes(8, "big"))
    for row_digest in row_digests:
        digest.update(row_digest)
    return digest.hexdigest()


RECORD_DIGEST_CHARS = 32
"""Length of a record digest in hex characters (128 bits of SHA-256: collisions are out of reach)."""


def record_digests(texts: Sequence[str], labels: Sequence[str]) -> list[str]:
    """One digest per row, the key under which the privacy ledger accounts each record's spend.

    SHA-256 over a domain tag and the length-prefixed UTF-8 of (text, label), hex, truncated to
    `RECORD_DIGEST_CHARS`. Like `fingerprint`, it depends only on the row's content: the file's
    path, format, row order and extra columns do not change it, so re-saving or reordering the
    file keeps every record's history, while an edited row is a new record (with no spend).

    Identical rows share a digest and are treated as one record: they are indistinguishable to
    the ledger, which therefore charges them as one. Group privacy is out of scope: an individual
    who appears in several *distinct* rows is protected per row, not as a person (their combined
    epsilon can be up to the sum over their rows); a site that needs that must key its rows per
    person upstream.

    Args:
        texts: One text per row.
        labels: One label per row, aligned with `texts`.

    Returns:
        The digests, aligned with the rows.

    Raises:
        DataError: if `texts` and `labels` differ in length.
    """
    if len(texts) != len(labels):
        raise DataError(f"record_digests: {len(texts)} texts but {len(labels)} labels; they must be row-aligned.")
    tag = b"fedtune.record.v1\0"
    return [
        hashlib.sha256(tag + _framed(text) + _framed(label)).hexdigest()[:RECORD_DIGEST_CHARS]
        for text, label in zip(texts, labels)
    ]


def _framed(value: str) -> bytes:
    # The length prefix keeps ("ab", "c") and ("a", "bc") apart; surrogatepass because JSON may carry lone
    # surrogates ("\ud800"), which strict UTF-8 cannot encode.
    data = value.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(8, "big") + data


def _unquoted(where: str, column: str, value: Any) -> RowProblem:
    """Why `_as_text` / `_as_value` refused ``value``, in words that do not quote it."""
    blank = _blank(value)
    return RowProblem(where, column, "is empty" if blank else f"holds {type(value).__name__}, not text", blank=blank)


def _blank(value: Any) -> bool:
    return value is MISSING or value is None or (isinstance(value, str) and not value.strip())


def _as_text(value: Any, where: str, column: str) -> str:
    if value is MISSING or value is None:
        raise DataError(f"{where}: missing value in text column {column!r}.")
    if not isinstance(value, str):
        raise DataError(f"{where}: text column {column!r} must hold strings, got {type(value).__name__}.")
    if not value.strip():
        raise DataError(f"{where}: text in column {column!r} is empty or whitespace-only: {value!r}.")
    return value


def _as_value(value: Any, where: str, column: str) -> str:
    if value is MISSING or value is None or (isinstance(value, str) and not value.strip()):
        found = "no such field" if value is MISSING else repr(value)
        raise DataError(f"{where}: missing value in column {column!r} (found {found}).")
    if isinstance(value, str):
        return value
    # bool is an int subclass, but True as a class name is almost surely a mistyped column.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{where}: column {column!r} must hold strings or integers, got {type(value).__name__} {value!r}; "
        "store labels as text."
    )


class _Lines:
    """The physical lines of a UTF-8 text file, each record read with a bounded buffer.

    ``TextIOWrapper.readline(n)`` stops after ``n`` characters even without a line break, so a
    record over the limit is refused after reading at most ``MAX_RECORD_CHARS + 1`` of its characters.
    A CSV record may span several lines: the reader calls `start` before each record, and the
    limit counts every line of it.
    """

    def __init__(self, path: Path, stream: io.TextIOWrapper) -> None:
        self.path = path
        self.lines = 0  # physical lines read so far
        self._stream = stream
        self._limit = MAX_RECORD_CHARS
        self._used = 0
        self._where = str(path)

    def start(self, where: str) -> None:
        """A new record begins; ``where`` names it in a refusal ("notes.csv row 3 (line 5)")."""
        self._used = 0
        self._where = where

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        try:
            line = self._stream.readline(self._limit - self._used + 1)
        except UnicodeDecodeError:
            raise _not_utf8(self.path) from None
        if not line:
            raise StopIteration
        self._used += len(line)
        if self._used > self._limit:
            raise DataError(
                f"{self._where}: the record is longer than {self._limit:,} characters (MAX_RECORD_CHARS in "
                "fedtune.common.data), so it was not read further; such a record is most likely a quoted field that "
                "is never closed, or a file without line breaks. Fix or shorten it (a model reads at most "
                "model.max_length tokens of a text)."
            )
        self.lines += 1
        return line


def _open_text(path: Path, newline: str) -> io.TextIOWrapper:
    # utf-8-sig drops a leading byte-order mark and nothing else; errors surface as UnicodeDecodeError.
    return open(path, encoding="utf-8-sig", errors="strict", newline=newline)


def _not_utf8(path: Path) -> DataError:
    """Name the first byte of ``path`` that is not UTF-8: its line and byte offset, found in bounded memory.

    The text reader decodes ahead in chunks, so where it failed says little; the file is scanned
    again here, a block at a time.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = newlines = 0
    with path.open("rb") as f:
        head = f.read(2)
        if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            return DataError(f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark); re-save it as UTF-8.")
        f.seek(0)
        while True:
            chunk = f.read(1 << 16)
            pending = len(decoder.getstate()[0])  # bytes of a character split across blocks, before this block
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                bad = offset - pending + err.start
                line = newlines + chunk.count(b"\n", 0, max(0, bad - offset)) + 1
                value = err.object[err.start]
                return DataError(f"{path} line {line}, byte offset {bad}: byte 0x{value:02x} is not valid UTF-8; {_UTF8_HINT}.")
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            offset += len(chunk)
    return DataError(f"{path}: not valid UTF-8; {_UTF8_HINT}.")  # unreachable unless the file changed meanwhile


def _missing_columns(path: Path, wanted: list[str], found: Sequence[str]) -> DataError | None:
    missing = [name for name in wanted if name not in found]
    if not missing:
        return None
    return DataError(f"{path}: missing column(s) {missing}; columns found: {list(found)}.")


def _read_csv(path: Path, wanted: list[str]) -> Iterator[_Record]:
    # newline="" leaves line endings to the csv module, so quoted fields may hold line breaks (CRLF kept as is).
    # Records are bounded by _Lines; the csv module's own field limit (128 Ki characters by default) would
    # refuse a long but legal text with a vaguer message. It is process-wide, so it is only ever raised (a
    # reader in another thread must never see it drop under its feet).
    if csv.field_size_limit() < MAX_RECORD_CHARS:
        csv.field_size_limit(MAX_RECORD_CHARS)
    with _open_text(path, newline="") as stream:
        yield from _csv_records(path, _Lines(path, stream), wanted)


def _csv_records(path: Path, lines: _Lines, wanted: list[str]) -> Iterator[_Record]:
    reader = csv.reader(lines)
    header: list[str] = []
    try:
        while not any(field.strip() for field in header):  # blank lines before the header
            lines.start(f"{path} header (line {lines.lines + 1})")
            header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: file is empty; expected a header row naming the columns, then data rows.") from None
    except csv.Error as err:
        raise DataError(f"{path} header: malformed CSV record: {err}.") from None
    error = _missing_columns(path, wanted, header)
    if error:
        raise error
    duplicated = [name for name in wanted if header.count(name) > 1]
    if duplicated:
        raise DataError(f"{path}: column(s) {duplicated} appear more than once in the header {header}.")
    positions = {name: header.index(name) for name in wanted}
    row = 0
    while True:
        line = lines.lines + 1
        lines.start(f"{path} row {row + 1} (line {line})")
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{path} row {row + 1} (line {line}): malformed CSV record: {err}.") from None
        if not fields:  # a blank line
            continue
        row += 1
        where = f"{path} row {row} (line {line})"
        if len(fields) != len(header):
            raise DataError(
                f"{where}: {len(fields)} fields but the header has {len(header)}; "
                "quote texts that contain commas, quotes or line breaks."
            )
        yield where, {name: fields[i] for name, i in positions.items()}


def _read_jsonl(path: Path, wanted: list[str]) -> Iterator[_Record]:
    # newline="\n": split on "\n" only; str.splitlines would also split at U+2028 and friends, which JSON strings
    # may hold raw. A CRLF line keeps its "\r", which JSON ignores as whitespace.
    with _open_text(path, newline="\n") as stream:
        lines = _Lines(path, stream)
        row = 0
        while True:
            lines.start(f"{path} row {row + 1} (line {lines.lines + 1})")
            line = next(lines, None)
            if line is None:
                return
            if not line.strip():
                continue
            row += 1
            where = f"{path} row {row} (line {lines.lines})"
            is_array = line.lstrip().startswith("[")
            hint = "; a .json file must hold one JSON object per line, not one array" if is_array else ""
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON at column {err.colno}: {err.msg}{hint}.") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}{hint}.")
            if row == 1:
                error = _missing_columns(path, wanted, list(record))
                if error:
                    raise error
            yield where, {name: record.get(name, MISSING) for name in wanted}


def _read_parquet(path: Path, wanted: list[str]) -> Iterator[_Record]:
    # Imported here so CSV and JSON Lines sites never pay for loading Arrow.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        error = _missing_columns(path, wanted, parquet.schema_arrow.names)
        if error:
            raise error
        batches = parquet.iter_batches(batch_size=1024, columns=wanted)
        row = 0
        # A batch at a time: memory is bounded by one row group's pages (Parquet's unit of reading), not
        # by MAX_RECORD_CHARS; values over the limit are still refused, naming the row.
        for batch in batches:
            columns = {name: batch.column(name).to_pylist() for name in wanted}
            for i in range(batch.num_rows):
                row += 1
                where = f"{path} row {row}"
                values = {name: column[i] for name, column in columns.items()}
                for name, value in values.items():
                    if isinstance(value, str) and len(value) > MAX_RECORD_CHARS:
                        raise DataError(
                            f"{where}: column {name!r} holds {len(value):,} characters, more than the {MAX_RECORD_CHARS:,} "
                            "a record may hold (MAX_RECORD_CHARS in fedtune.common.data); fix or shorten it."
                        )
                yield where, values
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}.") from None


_READERS: dict[str, Callable[[Path, list[str]], Iterator[_Record]]] = {
    ".csv": _read_csv,
    ".json": _read_jsonl,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}
