"""The privacy report and model card, from a run directory written by hand (no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fedtune.cli.privacy import report
from fedtune.common.errors import ConfigError
from fedtune.server.report import (
    build_privacy_report,
    epsilon_upper,
    model_card,
    write_model_card,
    write_privacy_report,
)

LABELS = ["cardiology", "neurology", "oncology"]


def _site(name: str, examples: int, eps: float, *, dp: bool = True, z: float = 1.1, q: float = 0.25,
          steps: int = 12, rounds: int = 3) -> dict[str, Any]:
    return {
        "site": name, "examples": examples, "epsilon": eps if dp else 0.0, "budget_epsilon": 8.0 if dp else 0.0,
        "delta": 1e-5 if dp else 0.0, "noise_multiplier": z if dp else 0.0, "clip_norm": 1.0 if dp else 0.0,
        "sample_rate": q, "steps": steps, "rounds": rounds,
    }


def _make_run(tmp_path: Path, *, dp: bool = True, accountant_in_summary: bool = True) -> Path:
    """Three sites with different epsilons; hospital-c skipped round 2 (not sampled)."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "README.md").write_text("# Model Card for Model ID\n[More Information Needed]\n")
    privacy: dict[str, Any] = (
        {"level": "sample-level DP-SGD at each site", "target_epsilon": 8.0, "delta": 1e-5}
        if dp else {"level": "NONE: trained without differential privacy"}
    )
    if dp and accountant_in_summary:
        privacy["accountant"] = "rdp"
    summary = {
        "rounds": 3, "base_model": "/models/minilm", "task": "sequence-classification", "labels": LABELS,
        "dp": dp, "privacy": privacy, "max_epsilon": 6.2 if dp else None,
        "test": {"accuracy": 0.81, "macro_f1": 0.79},
        "sites": [
            _site("hospital-a", 400, 1.5, dp=dp, z=2.0, q=0.1, steps=30),
            _site("hospital-b", 120, 6.2, dp=dp, z=0.9, q=0.5, steps=12),
            _site("hospital-c", 250, 3.0, dp=dp, steps=8, rounds=2),
        ],
    }
    (run / "summary.json").write_text(json.dumps(summary))
    by_round = [
        {"hospital-a": 0.8, "hospital-b": 3.1, "hospital-c": 2.0},
        {"hospital-a": 1.2, "hospital-b": 4.9},
        {"hospital-a": 1.5, "hospital-b": 6.2, "hospital-c": 3.0},
    ]
    lines = [
        {"round": r + 1, "epsilon_by_site": eps if dp else {k: 0.0 for k in eps}, "max_epsilon": max(eps.values())}
        for r, eps in enumerate(by_round)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "config.toml").write_text('seed = 0\n\n[privacy]\nenabled = true\naccountant = "rdp"\n')
    return run


def test_report_gives_each_sites_privacy_and_the_max_not_the_mean(tmp_path: Path) -> None:
    # Prepare
    run = _make_run(tmp_path)

    # Execute
    path = write_privacy_report(run)

    # Assert
    rep = json.loads(path.read_text())
    assert path == run / "privacy.json"
    by_site = {s["site"]: s for s in rep["sites"]}
    assert by_site["hospital-b"] == {
        "site": "hospital-b", "examples": 120, "epsilon_spent": 6.2, "budget_epsilon": 8.0, "delta": 1e-5,
        "noise_multiplier": 0.9, "clip_norm": 1.0, "sample_rate": 0.5, "steps": 12, "rounds": 3, "accountant": "rdp",
    }
    assert by_site["hospital-a"]["epsilon_spent"] == 1.5 and by_site["hospital-a"]["steps"] == 30
    assert rep["max_epsilon"] == 6.2 and rep["max_epsilon_site"] == "hospital-b"
    assert rep["max_epsilon"] != pytest.approx((1.5 + 6.2 + 3.0) / 3)
    assert "mean" not in json.dumps(rep).lower()
    assert rep["dp"] is True and rep["warnings"] == []
    assert "epsilon <= 6.20 at delta = 1e-05" in rep["guarantee"] and "RDP" in rep["guarantee"]


def test_report_lists_epsilon_only_for_rounds_a_site_took_part_in(tmp_path: Path) -> None:
    run = _make_run(tmp_path)

    rep = build_privacy_report(run)

    assert rep["epsilon_by_round"]["hospital-c"] == [{"round": 1, "epsilon": 2.0}, {"round": 3, "epsilon": 3.0}]
    assert [p["epsilon"] for p in rep["epsilon_by_round"]["hospital-b"]] == [3.1, 4.9, 6.2]


def test_report_writes_a_png_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    run = _make_run(tmp_path)

    write_privacy_report(run)

    assert (run / "privacy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_accountant_falls_back_to_the_runs_config(tmp_path: Path) -> None:
    run = _make_run(tmp_path, accountant_in_summary=False)
    (run / "config.toml").write_text('[privacy]\naccountant = "prv"\n')

    rep = build_privacy_report(run)

    assert rep["accountant"] == "prv"
    assert {s["accountant"] for s in rep["sites"]} == {"prv"}


def test_a_site_over_its_budget_or_disagreeing_files_give_warnings(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["sites"][1]["epsilon"] = 8.5  # hospital-b: over budget, and metrics.jsonl says 6.2
    (run / "summary.json").write_text(json.dumps(summary))

    rep = build_privacy_report(run)

    assert any("hospital-b" in w and "above its budget 8" in w for w in rep["warnings"])
    assert any("hospital-b" in w and "metrics.jsonl" in w for w in rep["warnings"])
    assert rep["max_epsilon"] == 8.5


def test_no_dp_run_says_there_is_no_guarantee_and_reports_no_epsilon(tmp_path: Path) -> None:
    run = _make_run(tmp_path, dp=False)

    rep = json.loads(write_privacy_report(run).read_text())

    assert rep["dp"] is False
    assert "WITHOUT differential privacy" in rep["guarantee"] and "no privacy guarantee" in rep["guarantee"]
    # 0 would read as perfect privacy; no DP means no bound at all.
    assert rep["max_epsilon"] is None
    assert all(s["epsilon_spent"] is None and s["delta"] is None for s in rep["sites"])
    assert (run / "privacy.png").is_file()


def test_missing_summary_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"summary\.json not found"):
        build_privacy_report(tmp_path)


def test_summary_missing_a_site_key_is_named(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    del summary["sites"][0]["clip_norm"]
    (run / "summary.json").write_text(json.dumps(summary))

    with pytest.raises(ConfigError, match=r"sites\[0\] \(hospital-a\) lacks \['clip_norm'\]"):
        build_privacy_report(run)


@pytest.mark.parametrize(("value", "text"), [(7.99532, "8.00"), (7.991, "8.00"), (2.0, "2.00"), (0.123, "0.13")])
def test_stated_epsilon_bound_is_rounded_up_never_down(value: float, text: str) -> None:
    assert epsilon_upper(value) == text
    assert float(epsilon_upper(value)) >= value


def test_model_card_states_model_data_and_guarantee(tmp_path: Path) -> None:
    summary = json.loads((_make_run(tmp_path) / "summary.json").read_text())

    card = model_card(summary)

    assert "base_model: /models/minilm" in card and "sequence-classification" in card
    for label in LABELS:
        assert f"`{label}`" in card
    assert "| hospital-a | 400 |" in card and "| hospital-b | 120 |" in card and "| hospital-c | 250 |" in card
    assert "Total training examples (approx.): 770." in card
    assert "sample-level (epsilon, delta)-differential privacy with epsilon <= 6.20 at delta = 1e-05" in card
    assert "RDP" in card and "received adapter updates" in card
    assert "PeftModel.from_pretrained" in card and "num_labels=len(labels)" in card


def test_model_card_without_dp_warns_and_claims_no_epsilon(tmp_path: Path) -> None:
    summary = json.loads((_make_run(tmp_path, dp=False) / "summary.json").read_text())

    card = model_card(summary)

    assert "WARNING" in card and "no privacy guarantee" in card
    assert "epsilon <=" not in card and "differential-privacy" not in card


def test_write_model_card_replaces_pefts_template(tmp_path: Path) -> None:
    run = _make_run(tmp_path)

    path = write_model_card(run)

    text = path.read_text()
    assert path == run / "adapter" / "README.md"
    assert "[More Information Needed]" not in text and "epsilon <= 6.20" in text


def test_report_command_prints_every_site_and_writes_all_three_files(tmp_path: Path) -> None:
    run = _make_run(tmp_path)

    result = CliRunner().invoke(report, [str(run)], terminal_width=200)

    assert result.exit_code == 0, result.output
    for name in ("hospital-a", "hospital-b", "hospital-c", "6.200", "1.500", "0.900"):
        assert name in result.output
    assert "max epsilon over sites: 6.200 (hospital-b)" in result.output
    assert (run / "privacy.json").is_file() and (run / "privacy.png").is_file()
    assert "epsilon <= 6.20" in (run / "adapter" / "README.md").read_text()


def test_report_command_on_a_folder_without_summary_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(report, [str(tmp_path)])

    assert result.exit_code == 2
    assert "summary.json not found" in result.output and "Traceback" not in result.output


def test_card_of_a_mean_pooling_adapter_loads_it_through_fedtune_not_a_transformers_head(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    (run / "adapter" / "fedtune.json").write_text(json.dumps({"labels": LABELS, "max_length": 64, "pooling": "mean"}))

    text = write_model_card(run).read_text()

    assert "load_adapter(" in text and "pooling: mean" in text
    assert "AutoModelForSequenceClassification" not in text


def test_model_card_names_sites_that_released_exact_statistics(tmp_path: Path) -> None:
    summary = json.loads((_make_run(tmp_path) / "summary.json").read_text())
    assert "exact training and validation statistics" not in model_card(summary)
    summary["sites"][1]["statistics"] = "clear"

    card = model_card(summary)

    assert "Sites hospital-b released exact training and validation statistics" in card
    assert "by their operator's opt-in: hospital-b" in card


def test_report_png_of_a_causal_lm_plots_test_perplexity_per_round_against_the_base_model(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedtune.server.records import RunRecorder

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    recorder = RunRecorder(tmp_path)
    for r, ppl in ((1, 30.5), (2, 27.25)):
        recorder.note_round({"round": r, "validated_round": r - 1, "accuracy": None, "test_accuracy": None, "test_perplexity": ppl})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty legend warns: the panel would be blank
        recorder.plot(dp=False, base_perplexity=33.0)
    panel = figures[0].axes[0]
    assert panel.get_ylabel() == "perplexity"
    lines = {line.get_label(): list(line.get_ydata()) for line in panel.get_lines()}
    assert lines["held-out test"] == [30.5, 27.25] and lines["base model"] == [33.0, 33.0]
    assert (tmp_path / "report.png").stat().st_size > 0
