"""metrics.jsonl, the per-round lines of a run directory, read by one reader for everyone.

The coordinator appends one line per round (`fedtune.server.records.RunRecorder`); the report,
resume, the dashboard and a later run's ``--init-adapter`` (the earlier run's epsilon) read it
through `read_metrics_file`. Here, in ``common/``, so that code outside ``server/`` reads it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "MetricsFile", "read_metrics_file"]

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True, kw_only=True)
class MetricsFile:
    """metrics.jsonl as read at one moment: its round lines, a torn last line, and any other damage.

    The one reader of the file (the report, resume, the dashboard), so that all agree on what a
    round line is and on the one damage a live or crashed run makes: the last line, cut short by
    an append in progress or a crash (`append_jsonl` writes a line and its newline in one write, so
    a line without its newline is not whole). What each does with other damage is its own choice:
    resume and the report refuse it, the dashboard shows it.
    """

    path: Path
    lines: tuple[dict[str, Any], ...]  # round lines in file order: JSON objects whose "round" is an int
    torn: bool  # the last line is not whole (no newline yet, or not a round line): dropped from ``lines``
    damaged: tuple[int, ...]  # 1-based numbers of other lines that are not round lines (edited or damaged)

    def damage(self) -> str | None:
        """One sentence naming the damaged lines, or None."""
        if not self.damaged:
            return None
        return (f"{self.path} line{'s' if len(self.damaged) > 1 else ''} {', '.join(map(str, self.damaged[:5]))}"
                f"{' ...' if len(self.damaged) > 5 else ''} {'are' if len(self.damaged) > 1 else 'is'} not a round's JSON line, "
                "and not a torn last line")


def _round_line(text: bytes) -> dict[str, Any] | None:
    try:
        line = json.loads(text)
    except ValueError:  # UnicodeDecodeError included
        return None
    if isinstance(line, dict) and isinstance(line.get("round"), int) and not isinstance(line["round"], bool):
        return line
    return None


def read_metrics_file(run_dir: Path) -> MetricsFile:
    """metrics.jsonl of ``run_dir`` (none yet: no lines)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = b""
    *whole, tail = raw.split(b"\n")
    torn = bool(tail.strip())
    lines, damaged = [], []
    numbered = [(i + 1, text) for i, text in enumerate(whole) if text.strip()]
    for k, (number, text) in enumerate(numbered):
        line = _round_line(text)
        if line is not None:
            lines.append(line)
        elif k == len(numbered) - 1 and not torn and number == len(whole):
            torn = True  # a torn append whose newline made it to disk
        else:
            damaged.append(number)
    return MetricsFile(path=path, lines=tuple(lines), torn=torn, damaged=tuple(damaged))
