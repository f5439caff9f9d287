"""A `site prepare` report for people: a terminal table and a small PNG (token lengths, labels).

Both show counts and row numbers only, like the JSON report they are drawn from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # prepare.py calls write_plot; no import circle at run time
    from .prepare import PrepareReport

# At most this many row numbers are named per line (the terminal table; `site check`'s problems), never a
# row's text; the JSON report has them all.
SHOWN_ROWS = 10


def row_list(rows: Sequence[object]) -> str:
    """The first ``SHOWN_ROWS`` row numbers (or names) and how many more: "3, 8, 12 and 4 more"; "" for none."""
    more = len(rows) - SHOWN_ROWS
    return ", ".join(str(n) for n in rows[:SHOWN_ROWS]) + (f" and {more} more" if more > 0 else "")


_REASONS = {
    "empty": "empty after normalisation",
    "missing_label": "no label",
    "unusable": "unusable (wrong type, not a chat)",
    "exact_duplicate": "exact duplicate (first kept)",
    "label_conflict": "same text, different labels (all dropped)",
    "near_duplicate": "near duplicate, same label (first kept)",
}


def render(report: PrepareReport, console: Any) -> None:
    """Print the report as rich tables on ``console`` (a `rich.console.Console`)."""
    from rich.table import Table

    r = report
    near = r.settings.near_dup
    console.print(f"[bold]site prepare[/bold] ({r.task}): {r.input.path} ({r.input.rows} rows) -> "
                  f"{r.output.path} ({r.output.rows} rows)")
    table = Table(title="Rows dropped", title_justify="left")
    for col in ("reason", "rows", "which (input rows)"):
        table.add_column(col)
    for name, numbers in ((k, getattr(r.dropped, k)) for k in _REASONS):
        table.add_row(_REASONS[name], str(len(numbers)), f"rows {row_list(numbers)}" if numbers else "")
    table.add_row("[bold]total[/bold]", f"[bold]{r.dropped.total}[/bold]", "")
    console.print(table)
    console.print(f"normalised: {r.normalised} rows changed (NFC, whitespace, {r.control_chars_removed} control or "
                  f"invisible characters removed); near duplicates: Jaccard >= {near.threshold:g} on character "
                  f"{near.shingle_chars}-grams")
    if r.deid.enabled:
        console.print("de-identified: " + (", ".join(f"{k} {v}" for k, v in sorted(r.deid.counts.items())) or "nothing found"))
    if r.label_conflicts:
        console.print("[yellow]label conflicts[/yellow] (same text, different labels; fix and run again): "
                      + "; ".join("rows " + ", ".join(map(str, g)) for g in r.label_conflicts[:SHOWN_ROWS]))
    if r.near_pairs_with_other_labels:
        console.print("[yellow]review[/yellow]: near-identical rows with different labels (both kept): "
                      + "; ".join(f"{p.row}~{p.kept} (J {p.jaccard:.2f})" for p in r.near_pairs_with_other_labels[:SHOWN_ROWS]))
    if r.prompts_with_several_responses:
        console.print(f"{r.prompts_with_several_responses} prompts have several different responses (all kept)")
    if r.labels_after:
        labels = Table(title="Labels", title_justify="left")
        for col in ("label", "before", "after", "share", ""):
            labels.add_column(col)
        total = sum(r.labels_after.values()) or 1
        for label in sorted(set(r.labels_before) | set(r.labels_after)):
            n = r.labels_after.get(label, 0)
            labels.add_row(label, str(r.labels_before.get(label, 0)), str(n), f"{n / total:.1%}",
                           "[yellow]rare[/yellow]" if label in r.rare_labels else "")
        console.print(labels)
    what = "texts" if r.task == "classification" else "responses"
    if r.short_rows:
        console.print(f"[yellow]short[/yellow]: {len(r.short_rows)} {what} under {r.settings.min_words} words (rows {row_list(r.short_rows)})")
    n = r.lengths
    console.print(f"tokens per example ({n.tokenizer}): median {n.median:g}, 95th percentile {n.p95}, max {n.max}; "
                  f"{n.truncated} of {r.output.rows} longer than max_length {n.max_length} (would be truncated"
                  + (f": rows {row_list(n.truncated_rows)}" if n.truncated_rows else "") + ")")
    for warning in r.warnings:
        console.print(f"[yellow]warning[/yellow]: {warning}")


def write_plot(report: PrepareReport, path: Path) -> None:
    """A two-panel PNG: the token-length histogram with the max-length line, and labels (or drop reasons)."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display at a site's server
    import matplotlib.pyplot as plt

    from fedtune.common.io import atomic_write_bytes

    n = report.lengths
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    if n.bin_counts:
        edges = n.bin_edges
        left.bar(edges[:-1], n.bin_counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="#4c72b0")
    left.axvline(n.max_length, color="#c44e52", linestyle="--", label=f"max_length {n.max_length}")
    left.set_xlabel("tokens per example")
    left.set_ylabel("rows")
    left.set_title(f"{n.truncated} of {report.output.rows} truncated")
    left.legend(fontsize=8)
    if report.labels_after:
        names = list(report.labels_after)
        colors = ["#dd8452" if k in report.rare_labels else "#55a868" for k in names]
        right.barh(names, [report.labels_after[k] for k in names], color=colors)
        right.set_xlabel("rows kept")
        right.set_title("labels (orange: rare)")
    else:
        counts = report.dropped.counts()
        right.barh(list(counts), list(counts.values()), color="#8172b3")
        right.set_xlabel("rows dropped")
        right.set_title("dropped, by reason")
    right.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
