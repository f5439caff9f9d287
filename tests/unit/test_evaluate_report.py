"""`fedtune evaluate`'s expert review (fedtune/evaluate_report.py).

Expected values come from scikit-learn (`precision_recall_fscore_support` with ``zero_division=np.nan``,
`confusion_matrix`) when it is installed, and from a small case computed by hand in this file
always; the model-driven report is checked against `fedtune.common.tasks`' own evaluate/predict_proba.
"""

from __future__ import annotations

import csv
import io
import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest

from fedtune.common.errors import ConfigError, DataError
from fedtune.evaluate_report import (
    Misclassified,
    class_report,
    confusion_path_beside,
    report_table,
    review,
    write_confusion_png,
    write_errors,
)

LABELS = ("a", "b", "c", "d")


def test_a_small_case_computed_by_hand() -> None:
    # true a a b b c, predicted a b b b a; "d" is neither present nor predicted.
    report = class_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], LABELS)
    a, b, c, d = report.classes
    assert (a.precision, a.recall, a.f1, a.support) == (0.5, 0.5, 0.5, 2)
    assert (b.precision, b.recall, b.f1, b.support) == (pytest.approx(2 / 3), 1.0, pytest.approx(0.8), 2)
    assert (c.precision, c.recall, c.f1, c.support) == (None, 0.0, 0.0, 1)  # never predicted: precision 0/0, undefined
    assert (d.precision, d.recall, d.f1, d.support) == (None, None, None, 0)
    assert report.macro.precision == pytest.approx((0.5 + 2 / 3) / 2)  # c and d have none: left out, not counted as 0
    assert report.macro.recall == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert report.macro.f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert report.weighted.precision == pytest.approx((0.5 * 2 + 2 / 3 * 2) / 4)
    assert report.weighted.recall == pytest.approx(3 / 5) == report.accuracy
    assert report.weighted.f1 == pytest.approx((0.5 * 2 + 0.8 * 2 + 0.0 * 1) / 5)
    assert report.confusion == ((1, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (0, 0, 0, 0))
    assert report.examples == report.macro.support == report.weighted.support == 5
    data = json.loads(json.dumps(report.to_json()))  # JSON-safe: undefined is null, never NaN
    assert data["per_class"][3] == {"label": "d", "precision": None, "recall": None, "f1": None, "support": 0}
    assert data["confusion_matrix"]["labels"] == list(LABELS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_scores_and_averages_match_scikit_learn(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed; the hand-computed case still runs")
    rng = np.random.default_rng(seed)
    y_true = rng.choice(5, size=200, p=[0.5, 0.3, 0.15, 0.05, 0.0])  # label 4 absent
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.choice(4, size=200))  # never predicts 4 either
    y_pred[y_pred == 3] = 0  # label 3 present but never predicted: its precision is undefined
    labels = ["cardio", "neuro", "onco", "derm", "rare"]
    report = class_report(y_true, y_pred, labels)

    def ours(values: list[float | None]) -> list[float]:
        return [math.nan if v is None else v for v in values]

    p, r, f, s = metrics.precision_recall_fscore_support(y_true, y_pred, labels=range(5), zero_division=np.nan)
    np.testing.assert_allclose(ours([c.precision for c in report.classes]), p, equal_nan=True)
    np.testing.assert_allclose(ours([c.recall for c in report.classes]), r, equal_nan=True)
    np.testing.assert_allclose(ours([c.f1 for c in report.classes]), f, equal_nan=True)
    assert [c.support for c in report.classes] == list(s)
    for average, got in (("macro", report.macro), ("weighted", report.weighted)):
        p, r, f, _ = metrics.precision_recall_fscore_support(y_true, y_pred, labels=range(5), average=average, zero_division=np.nan)
        assert (got.precision, got.recall, got.f1) == pytest.approx((p, r, f)), average
    assert report.confusion == tuple(map(tuple, metrics.confusion_matrix(y_true, y_pred, labels=range(5)).tolist()))
    assert report.accuracy == pytest.approx(metrics.accuracy_score(y_true, y_pred))


def test_macro_f1_is_the_one_training_reports() -> None:
    from fedtune.common.tasks import macro_f1

    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
    assert class_report(y_true, y_pred, LABELS).macro.f1 == pytest.approx(macro_f1(y_true, y_pred, 4))


def test_bad_inputs_are_refused_with_what_was_found() -> None:
    with pytest.raises(DataError, match=r"outside the label map of 4 labels"):
        class_report([0, 4], [0, 1], LABELS)
    with pytest.raises(DataError, match="at least one row"):
        class_report([], [], LABELS)
    with pytest.raises(DataError, match=r"\(2,\) and \(3,\)"):
        class_report([0, 1], [0, 1, 1], LABELS)


def test_review_scores_a_real_adapter_like_the_training_metrics(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from fedtune.common.data import TextTable
    from fedtune.common.tasks import encode, evaluate, predict_proba
    from fedtune.inference import LoadedAdapter
    from tests.unit.lora_models import lora_model

    labels = ["cardio", "neuro", "onco"]
    texts = [f"patient {i} reports {w} pain" for i, w in enumerate(["chest", "head", "back", "knee", "no"] * 6)]
    truth = [labels[i % 3] for i in range(len(texts))]
    loaded = LoadedAdapter(model=lora_model(tiny_model_dir, 3), tokenizer=AutoTokenizer.from_pretrained(str(tiny_model_dir)),
                           labels=labels, max_length=32, base=tiny_model_dir)
    table = TextTable(texts=texts, labels=truth, source="notes.csv", columns={})

    result = review(loaded, table, batch_size=7)  # batches that do not divide the rows

    dataset = encode(loaded.tokenizer, texts, truth, labels, max_length=32)
    expected = evaluate(loaded.model, dataset, 3)
    probs = predict_proba(loaded.model, dataset)
    assert result.report.accuracy == pytest.approx(expected.accuracy)
    assert result.report.macro.f1 == pytest.approx(expected.macro_f1)
    assert result.loss == pytest.approx(expected.loss, rel=1e-5)
    wrong = [i for i in range(len(texts)) if labels[int(probs[i].argmax())] != truth[i]]
    assert wrong, "the random adapter got every row right; the test would check nothing"
    assert [e.row for e in result.errors] == [i + 1 for i in wrong]
    for e in result.errors:
        i = e.row - 1
        assert (e.text, e.true_label) == (texts[i], truth[i])
        assert e.predicted_label == labels[int(probs[i].argmax())] != e.true_label
        assert e.score == pytest.approx(float(probs[i].max()), abs=1e-6)
        assert e.true_label_score == pytest.approx(float(probs[i, labels.index(truth[i])]), abs=1e-6)
    assert result.to_json()["examples"] == len(texts) and len(result.to_json()["per_class"]) == 3


def test_score_examples_gives_each_rows_loss_and_probabilities_for_the_review_and_the_audit(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from fedtune.audit import per_example_losses
    from fedtune.common.tasks import encode, score_examples
    from tests.unit.lora_models import lora_model

    labels = ["cardio", "neuro", "onco"]
    texts = ["chest pain", "a much longer note about a headache that started two days ago", "back", "no complaints today"]
    truth = ["cardio", "neuro", "onco", "cardio"]
    model = lora_model(tiny_model_dir, 3)
    model.train()
    dataset = encode(AutoTokenizer.from_pretrained(str(tiny_model_dir)), texts, truth, labels, max_length=32)

    scores = score_examples(model, dataset, batch_size=3)  # a batch of 3 and one of 1, trimmed to their own widths

    # Independent: each row alone, full padded width, through the plain model and torch's log-softmax.
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=dataset.tensors[0][i:i + 1], attention_mask=dataset.tensors[1][i:i + 1]).logits
                            for i in range(len(texts))])
    by_hand = -torch.log_softmax(logits, dim=-1)[torch.arange(len(texts)), dataset.tensors[2]]
    model.train()
    score_examples(model, dataset)
    assert model.training, "the caller's training mode is restored"
    assert scores.losses.dtype == np.float64 and scores.losses.shape == (4,)
    np.testing.assert_allclose(scores.losses, by_hand.numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores.probabilities, torch.softmax(logits, dim=-1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(per_example_losses(model, dataset, batch_size=3), scores.losses)  # the audit's losses are these


def test_predict_proba_gives_what_its_own_loop_gave_and_restores_the_training_mode(tiny_model_dir: Path) -> None:
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from fedtune.common.tasks import encode, forward_loss, predict_proba
    from tests.unit.lora_models import lora_model

    labels = ["cardio", "neuro", "onco"]
    texts = ["chest pain", "a much longer note about a headache that started two days ago", "back", "no complaints today",
             "knee swollen after a fall"]
    model = lora_model(tiny_model_dir, 3)
    dataset = encode(AutoTokenizer.from_pretrained(str(tiny_model_dir)), texts, [labels[0]] * len(texts), labels, max_length=32)
    model.eval()
    with torch.no_grad():  # the loop predict_proba ran before it shared score_examples' pass (batches of 2, 2 and 1)
        before = np.concatenate([torch.softmax(forward_loss(model, batch)[1], dim=-1).numpy()
                                 for batch in DataLoader(dataset, batch_size=2)])
        alone = torch.cat([torch.softmax(model(input_ids=dataset.tensors[0][i:i + 1],
                                               attention_mask=dataset.tensors[1][i:i + 1]).logits, dim=-1) for i in range(len(texts))])
    model.train()

    probs = predict_proba(model, dataset, batch_size=2)

    assert probs.dtype == before.dtype and np.array_equal(probs, before), "bit for bit what the old loop returned"
    np.testing.assert_allclose(probs, alone.numpy(), atol=1e-6)  # each row alone, at full padded width
    assert not np.allclose(probs, probs[:1]), "the rows differ: the comparison could fail"
    assert model.training, "the caller's training mode is restored"


ERRORS = (Misclassified(row=3, text='says "no", then, =SUM(A1)\nnew line', true_label="cardio", predicted_label="neuro",
                        score=0.75, true_label_score=0.125),
          Misclassified(row=9, text="Ünïcode – ok", true_label="onco", predicted_label="cardio", score=0.5, true_label_score=0.25))


def test_errors_file_round_trips_as_csv_and_jsonl_and_is_private(tmp_path: Path) -> None:
    csv_path = write_errors(tmp_path / "errors.csv", ERRORS)
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8"), newline="")))
    assert [(int(r["row"]), r["text"], r["true_label"], r["predicted_label"], float(r["score"])) for r in rows] == [
        (e.row, e.text, e.true_label, e.predicted_label, e.score) for e in ERRORS]
    jsonl = write_errors(tmp_path / "errors.jsonl", ERRORS)
    assert [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()] == [
        {"row": e.row, "text": e.text, "true_label": e.true_label, "predicted_label": e.predicted_label, "score": e.score,
         "true_label_score": e.true_label_score} for e in ERRORS]
    for path in (csv_path, jsonl):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the site's own text: its owner only
    write_errors(jsonl, ERRORS[:1])  # a second evaluation replaces the file
    assert len(jsonl.read_text(encoding="utf-8").splitlines()) == 1
    with pytest.raises(ConfigError, match=r"--errors .*errors\.xlsx.*\['\.csv', '\.jsonl'\], got '\.xlsx'"):
        write_errors(tmp_path / "errors.xlsx", ERRORS)
    with pytest.raises(ConfigError, match="does not exist"):
        write_errors(tmp_path / "missing" / "errors.csv", ERRORS)


def test_confusion_png_and_table(tmp_path: Path) -> None:
    import matplotlib.image
    from rich.console import Console

    report = class_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], LABELS)
    out = write_confusion_png(tmp_path / "cm.png", report)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(out).ndim == 3
    assert confusion_path_beside(tmp_path / "eval.json") == tmp_path / "eval.confusion.png"
    console = Console(file=io.StringIO(), width=120)
    console.print(report_table(report))
    text = console.file.getvalue()
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 5}
    assert set(lines) >= {"a", "b", "c", "d", "macro avg", "weighted avg"}
    assert [cell.strip() for cell in lines["c"].split("│")[2:6]] == ["-", "0.000", "0.000", "1"]


def test_fedtune_evaluate_writes_the_report_the_matrix_and_the_errors_locally(tiny_model_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main
    from fedtune.common.model import save_adapter
    from tests.unit.lora_models import lora_model

    labels = ["cardio", "neuro", "onco"]
    adapter = tmp_path / "run" / "adapter"
    save_adapter(lora_model(tiny_model_dir, 3), adapter, metadata={"labels": labels, "max_length": 32, "base_model": str(tiny_model_dir)})
    texts = [f"note {i}: {w} since {i % 4} days" for i, w in enumerate(["chest pain", "headache", "lump", "dizzy", "rash"] * 4)]
    truth = [labels[(i * 7) % 3] for i in range(len(texts))]
    data = tmp_path / "notes.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(texts, truth)])
    runner = CliRunner()
    predicted = runner.invoke(main, ["predict", "--adapter", str(adapter), *texts])  # the independent path: `fedtune predict`
    assert predicted.exit_code == 0, predicted.output
    predictions = [line.split("\t")[:2] for line in predicted.stdout.splitlines()[-len(texts):]]

    result = runner.invoke(main, ["evaluate", "--adapter", str(adapter), "--data", str(data), "--json", str(tmp_path / "eval.json"),
                                  "--errors", str(tmp_path / "review.csv")])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1]) == json.loads((tmp_path / "eval.json").read_text())
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [c["support"] for c in report["per_class"]] == [truth.count(x) for x in labels]
    assert report["confusion_matrix"]["labels"] == labels
    assert sum(map(sum, report["confusion_matrix"]["matrix"])) == len(texts) == report["examples"]
    wrong = [(i + 1, p) for i, (p, _) in enumerate(predictions) if p != truth[i]]
    assert 0 < len(wrong) < len(texts), "the adapter must get some rows right and some wrong for this test to check anything"
    rows = list(csv.DictReader(open(tmp_path / "review.csv", encoding="utf-8", newline="")))
    assert [(int(r["row"]), r["predicted_label"]) for r in rows] == wrong
    assert [float(r["score"]) for r in rows] == pytest.approx([float(predictions[i - 1][1]) for i, _ in wrong], abs=5e-4)
    assert report["accuracy"] == pytest.approx(1 - len(wrong) / len(texts))
    assert (tmp_path / "eval.confusion.png").read_bytes()[:4] == b"\x89PNG"  # beside --json when --confusion is not given
    assert "macro avg" in result.stdout and "onco" in result.stdout

    refused = runner.invoke(main, ["evaluate", "--adapter", str(adapter), "--data", str(data), "--errors", str(tmp_path / "x.txt")])
    assert refused.exit_code != 0 and "--errors" in refused.output and "'.txt'" in refused.output
    lm = tmp_path / "lm-adapter"
    lm.mkdir()
    (lm / "fedtune.json").write_text('{"task": "causal-lm"}')
    refused = runner.invoke(main, ["evaluate", "--adapter", str(lm), "--data", str(data), "--confusion", str(tmp_path / "cm.png")])
    assert refused.exit_code != 0 and "--confusion is for classification adapters" in refused.output
