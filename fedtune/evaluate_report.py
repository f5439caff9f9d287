"""Expert review of a classification adapter, on the site's own machine: `fedtune evaluate`'s report.

Per class: precision, recall, F1 and support, with macro and weighted averages; the confusion
matrix (rows: true label, columns: predicted label, in the adapter's label order) as numbers and as
a PNG; and the misclassified rows (text, true label, predicted label, score) in a local CSV or JSON
Lines file for the site's domain experts. Nothing here opens a socket: the files stay where they are
written, and the coordinator-side evaluation (federated validation, the held-out test set) is
untouched.

Undefined is not zero. A class never predicted has no precision (0/0), a class absent from the data
has no recall, and a class neither present nor predicted has no F1 either: such a value is None (null
in JSON, "-" in the table) and is left out of the averages, as scikit-learn does with
``zero_division=np.nan``. So the macro F1 here is `fedtune.common.tasks.macro_f1`'s (the mean over
the labels present in truth or prediction). Weighted averages weigh each class by its support.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.common.errors import ConfigError, DataError
from fedtune.common.io import atomic_write_bytes, write_file_exclusive

if TYPE_CHECKING:
    from rich.table import Table

    from fedtune.common.data import TextTable
    from fedtune.inference import LoadedAdapter

logger = logging.getLogger(__name__)

ERROR_FORMATS = (".csv", ".jsonl")
ERROR_COLUMNS = ("row", "text", "true_label", "predicted_label", "score", "true_label_score")


@dataclass(frozen=True, kw_only=True)
class ClassScores:
    """One class's scores; None where the ratio is 0/0 (see the module docstring)."""

    label: str
    precision: float | None
    recall: float | None
    f1: float | None
    support: int  # rows whose true label this is


@dataclass(frozen=True, kw_only=True)
class Averages:
    precision: float | None
    recall: float | None
    f1: float | None
    support: int  # all rows


@dataclass(frozen=True, kw_only=True)
class ClassReport:
    """Per-class scores, their averages and the confusion matrix of one labelled data set."""

    labels: tuple[str, ...]  # the adapter's label map, in index order
    classes: tuple[ClassScores, ...]  # one per label, in that order
    macro: Averages
    weighted: Averages
    accuracy: float
    examples: int
    confusion: tuple[tuple[int, ...], ...]  # confusion[t][p]: rows of true label t predicted as p

    def to_json(self) -> dict[str, Any]:
        return {"per_class": [asdict(c) for c in self.classes], "macro_avg": asdict(self.macro),
                "weighted_avg": asdict(self.weighted),
                "confusion_matrix": {"labels": list(self.labels), "rows": "true label", "columns": "predicted label",
                                     "matrix": [list(r) for r in self.confusion]}}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _average(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    kept = [(v, w) for v, w in zip(values, weights) if v is not None]
    total = sum(w for _, w in kept)
    return sum(v * w for v, w in kept) / total if kept and total > 0 else None


def class_report(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: Sequence[str]) -> ClassReport:
    """Per-class precision, recall, F1 and support of ``y_pred`` against ``y_true`` (indices into ``labels``).

    Raises:
        DataError: no rows, lengths differ, or an index outside the label map.
    """
    t, p, k = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64), len(labels)
    if t.shape != p.shape or t.ndim != 1:
        raise DataError(f"class_report needs one predicted label per true label, got {t.shape} and {p.shape}.")
    if t.size == 0:
        raise DataError("class_report needs at least one row, got none.")
    outside = sorted({int(i) for i in np.concatenate([t, p]) if not 0 <= i < k})
    if outside:
        raise DataError(f"label indices {outside[:5]} are outside the label map of {k} labels {list(labels)}.")
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (t, p), 1)
    classes = []
    for i, name in enumerate(labels):
        tp, support, predicted = int(confusion[i, i]), int(confusion[i].sum()), int(confusion[:, i].sum())
        # F1 = 2tp / (2tp + fp + fn): defined whenever the class was present or predicted.
        classes.append(ClassScores(label=str(name), precision=_ratio(tp, predicted), recall=_ratio(tp, support),
                                   f1=_ratio(2 * tp, support + predicted), support=support))
    n = int(t.size)

    def averages(weights: Sequence[float]) -> Averages:
        return Averages(precision=_average([c.precision for c in classes], weights), recall=_average([c.recall for c in classes], weights),
                        f1=_average([c.f1 for c in classes], weights), support=n)

    return ClassReport(labels=tuple(str(x) for x in labels), classes=tuple(classes), macro=averages([1.0] * k),
                       weighted=averages([float(c.support) for c in classes]), accuracy=float(np.trace(confusion)) / n,
                       examples=n, confusion=tuple(tuple(int(x) for x in row) for row in confusion))


# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True, kw_only=True)
class Misclassified:
    """One row the adapter got wrong, for the site's experts (it holds the site's own text: it stays local)."""

    row: int  # 1-based data row of the evaluated file (fedtune.common.data's numbering)
    text: str
    true_label: str
    predicted_label: str
    score: float  # the adapter's probability of its (wrong) prediction
    true_label_score: float  # its probability of the true label


@dataclass(frozen=True, kw_only=True)
class Review:
    """What `fedtune evaluate` reports for a classification adapter."""

    loss: float  # mean cross-entropy
    report: ClassReport
    errors: tuple[Misclassified, ...]  # in row order

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {"examples": r.examples, "accuracy": r.accuracy, "macro_f1": r.macro.f1, "loss": self.loss, **r.to_json()}


def review(loaded: LoadedAdapter, table: TextTable, *, batch_size: int = 64) -> Review:
    """Score ``table`` (labels already checked against the adapter's) with the adapter; the report and the errors.

    Raises:
        DataError: a label outside the adapter's label map (`fedtune.common.data.check_labels` names the rows first).
    """
    from fedtune.common.tasks import encode, score_examples

    dataset = encode(loaded.tokenizer, table.texts, table.labels, loaded.labels, max_length=loaded.max_length)
    scores = score_examples(loaded.model, dataset, batch_size=batch_size)
    losses, probs = scores.losses, scores.probabilities
    y_true, y_pred = dataset.tensors[2].numpy(), probs.argmax(axis=1)
    report = class_report(y_true, y_pred, loaded.labels)
    errors = tuple(Misclassified(row=i + 1, text=table.texts[i], true_label=loaded.labels[int(y_true[i])],
                                 predicted_label=loaded.labels[int(y_pred[i])], score=float(probs[i, y_pred[i]]),
                                 true_label_score=float(probs[i, y_true[i]]))
                   for i in np.flatnonzero(y_true != y_pred))
    return Review(loss=float(losses.mean()), report=report, errors=errors)


# -------------------------------------------------------------------------------------- outputs


def check_errors_path(path: Path) -> Path:
    """``path`` if `write_errors` can write there (checked before the model runs).

    Raises:
        ConfigError: a suffix other than .csv or .jsonl, or a folder that does not exist.
    """
    path = Path(path)
    if path.suffix.lower() not in ERROR_FORMATS:
        raise ConfigError(f"--errors {path}: the file's suffix picks its format and must be one of {list(ERROR_FORMATS)}, "
                          f"got {path.suffix or 'none'!r}.")
    if not path.parent.is_dir():
        raise ConfigError(f"--errors {path}: the folder {path.parent} does not exist.")
    return path


def write_errors(path: Path, errors: Sequence[Misclassified]) -> Path:
    """Write the misclassified rows to ``path`` (.csv or .jsonl, by its suffix), readable by its owner only.

    The file holds the site's text, so it is created 0600 and replaced whole (never a half-written
    file). A CSV cell is the text exactly as stored: open it as data, not as a formula sheet.

    Raises:
        ConfigError: see `check_errors_path`.
    """
    path = check_errors_path(path)
    rows = [asdict(e) for e in errors]
    if path.suffix.lower() == ".csv":
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=ERROR_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        data = buf.getvalue()
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_file_exclusive(path, data.encode("utf-8"), mode=0o600, overwrite=True)
    return path


def confusion_path_beside(json_path: Path) -> Path:
    """Where the confusion matrix goes when only --json is given: next to it, ``NAME.confusion.png``."""
    return json_path.with_name(json_path.stem + ".confusion.png")


def write_confusion_png(path: Path, report: ClassReport, *, title: str = "Confusion matrix") -> Path:
    """The confusion matrix as a PNG: counts in each cell, shaded by the share of the true label's rows."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a site's server
    import matplotlib.pyplot as plt

    counts = np.asarray(report.confusion, dtype=float)
    support = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    k = len(report.labels)
    side = min(4.0 + 0.6 * k, 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true label's rows")
    ax.set_xticks(range(k), labels=list(report.labels), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(report.labels))
    ax.set(xlabel="predicted label", ylabel="true label", title=f"{title} ({report.examples} rows, accuracy {report.accuracy:.3f})")
    for t in range(k):
        for p in range(k):
            ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", color="white" if share[t, p] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def report_table(report: ClassReport) -> Table:
    """The per-class report as a rich table (averages last)."""
    from rich.table import Table

    def f(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = Table(title=f"Per-class report ({report.examples} rows, accuracy {report.accuracy:.4f})")
    table.add_column("label")
    for name in ("precision", "recall", "F1", "support"):
        table.add_column(name, justify="right")
    for c in report.classes:
        table.add_row(c.label, f(c.precision), f(c.recall), f(c.f1), str(c.support))
    table.add_section()
    for name, avg in (("macro avg", report.macro), ("weighted avg", report.weighted)):
        table.add_row(name, f(avg.precision), f(avg.recall), f(avg.f1), str(avg.support))
    return table
