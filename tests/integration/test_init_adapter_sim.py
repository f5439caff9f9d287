"""Periodic updates end to end: simulation B starts from simulation A's adapter (``model.init_adapter``).

Two real runs through Flower's simulation engine (tiny model, 2 sites, 1 round each, 300 rows).
B's evaluation of its initial parameters is compared with ``fedtune evaluate`` of A's adapter (PEFT's
own loading, not B's), its sites' ledgers with Google's dp-accounting over both runs' charges.
Marked slow (two engine runs, a minute or two): `make test` runs it; `make test-fast` skips it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from fedtune.common.config import RunConfig, from_dict

pytestmark = pytest.mark.slow


def _config(tiny: Path, data: Path, out: Path, **extra: dict) -> RunConfig:  # type: ignore[type-arg]
    base = {
        "model": {"base_model": str(tiny), "max_length": 32},
        "data": {"path": str(data)},
        "federation": {"sites": 2, "rounds": 1, "min_sites": 2},
        "train": {"local_epochs": 1.0, "batch_size": 32},
        "out": str(out),
    }
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value}
    return from_dict(base)


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import fedtune.common.init_adapter as init_adapter
    from fedtune.simulations.simulate import run_simulation

    root = tmp_path_factory.mktemp("init-adapter-sim")
    demo = Path(__file__).resolve().parents[2] / "common" / "demo_data" / "clinical_triage.csv"
    with open(demo, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[::5]  # every fifth row: 300, every label
    data = root / "data.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    run_a = run_simulation(_config(tiny_model_dir, data, root / "A", privacy={"target_epsilon": 2.0}))
    # B: a larger lifetime target (the sites have spent A's share of it), exact validation statistics so
    # its first round's validation can be compared with `fedtune evaluate`.
    reads: list[Path] = []
    real = init_adapter.read_earlier_adapter

    def counted(folder):  # type: ignore[no-untyped-def]  # a spy: the real reader, counted
        reads.append(Path(folder))
        return real(folder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(init_adapter, "read_earlier_adapter", counted)
        run_b = run_simulation(_config(tiny_model_dir, data, root / "B", model={"init_adapter": str(run_a / "adapter")},
                                       privacy={"target_epsilon": 4.0, "statistics": "clear"}))
    return {"A": run_a, "B": run_b, "data": data, "root": root, "reads": reads}


def test_the_earlier_adapter_is_read_once_by_the_preflight_and_not_again_by_the_coordinator(runs: dict[str, Any]) -> None:
    assert runs["reads"] == [runs["A"] / "adapter"], "the preflight read it; the ServerApp took what it read"


def _evaluate(adapter: Path, texts: list[str], labels: list[str], folder: Path) -> dict:  # type: ignore[type-arg]
    """`fedtune evaluate` of ``adapter`` on these rows: the CLI, which loads it with PeftModel.from_pretrained."""
    from click.testing import CliRunner

    from fedtune.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    rows, out = folder / "rows.csv", folder / "metrics.json"
    with open(rows, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels))
    result = CliRunner().invoke(main, ["evaluate", "--adapter", str(adapter), "--data", str(rows), "--json", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_the_first_evaluation_is_the_earlier_adapters_own(runs: dict[str, Path]) -> None:
    from fedtune.common.data import load_table
    from fedtune.common.sitedata import simulated_split, site_examples

    summary = json.loads((runs["B"] / "summary.json").read_text())
    config = _config(Path("."), runs["data"], runs["B"]).data
    table = load_table(str(runs["data"]))
    split = simulated_split(table, config, num_sites=2, seed=0)

    # The coordinator's score of the initial parameters, on the held-out test split.
    expected = _evaluate(runs["A"] / "adapter", [table.texts[i] for i in split.test], [table.labels[i] for i in split.test],
                         runs["root"] / "eval-test")
    initial = summary["init_adapter"]["test"]
    assert initial["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert initial["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-9)
    assert initial["loss"] == pytest.approx(expected["loss"], rel=1e-5)

    # Round 1's federated validation (exact statistics): the sites validated A's adapter on their validation splits.
    val = [site_examples(table, split.sites[k], val_fraction=config.val_fraction, seed=0 + k) for k in range(2)]
    pooled = _evaluate(runs["A"] / "adapter", [t for v in val for t in v.val_texts], [y for v in val for y in v.val_labels],
                       runs["root"] / "eval-val")
    line = json.loads((runs["B"] / "metrics.jsonl").read_text().splitlines()[0])
    assert line["validated_round"] == 0
    assert line["accuracy"] == pytest.approx(pooled["accuracy"], abs=1e-9)
    assert line["loss"] == pytest.approx(pooled["loss"], rel=1e-5)
    assert summary["init_adapter"]["labels_added"] == []


def test_each_sites_ledger_counts_both_runs_and_its_epsilon_composes_them(runs: dict[str, Path]) -> None:
    from dp_accounting import dp_event, rdp

    from fedtune.client.ledger import PrivacyLedger

    run_a = json.loads((runs["A"] / "run.json").read_text())["run_id"]
    run_b = json.loads((runs["B"] / "run.json").read_text())["run_id"]
    summary_a = json.loads((runs["A"] / "summary.json").read_text())
    summary_b = json.loads((runs["B"] / "summary.json").read_text())
    for site in ("site-0", "site-1"):
        charges = [c for c in PrivacyLedger(runs["B"] / "sites" / site).charges() if c.kind == "dp-sgd"]
        mine = [c for c in charges if c.cohort in {c2.cohort for c2 in charges if c2.run == run_b}]  # this site's records
        assert {c.run for c in mine} == {run_a, run_b}, "the site's records carry run A's training and run B's"

        def independent(selected: list) -> float:  # type: ignore[type-arg]
            acc = rdp.RdpAccountant(orders=[1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256)))
            for c in selected:
                acc.compose(dp_event.PoissonSampledDpEvent(c.sample_rate, dp_event.GaussianDpEvent(c.noise_multiplier)), c.steps)
            return acc.get_epsilon(1e-5)

        reported = next(s["epsilon"] for s in summary_b["sites"] if s["site"] == site)
        earlier = next(s["epsilon"] for s in summary_a["sites"] if s["site"] == site)
        assert reported == pytest.approx(independent(mine), rel=0.02), "B's epsilon is the composition of both runs"
        assert reported == pytest.approx(4.0, rel=0.02), "calibrated so the lifetime total lands on B's target"
        # Alone, B's charges come to less than the total: it was planned for what A left (without A's charges in its
        # ledger, B would have been calibrated to reach 4 on its own). RDP composes sublinearly: ~3.4 here, not 4 - 2.
        assert earlier > 0 and independent([c for c in mine if c.run == run_b]) < reported - 0.2
    # The earlier run's ledgers were only read.
    assert all(c.run == run_a for c in PrivacyLedger(runs["A"] / "sites" / "site-0").charges())


def test_the_adapter_and_its_card_carry_the_lineage(runs: dict[str, Path]) -> None:
    from fedtune.server.report import epsilon_upper

    run_a = json.loads((runs["A"] / "run.json").read_text())["run_id"]
    summary_a = json.loads((runs["A"] / "summary.json").read_text())
    digest = "sha256:" + hashlib.sha256((runs["A"] / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
    meta = json.loads((runs["B"] / "adapter" / "fedtune.json").read_text())
    # Named portably (its run directory's name and folder), never by the coordinator's absolute path: the digest says which.
    assert meta["lineage"] == [{"run_id": run_a, "adapter": "A/adapter", "digest": digest, "epsilon": summary_a["max_epsilon"]}]
    assert str(runs["root"]) not in (runs["B"] / "adapter" / "fedtune.json").read_text().replace(meta["base_model"], "")
    card = (runs["B"] / "adapter" / "README.md").read_text()
    assert "## Lineage" in card
    assert f"| {run_a} | `{digest.removeprefix('sha256:')[:16]}` | {epsilon_upper(summary_a['max_epsilon'])} |" in card
    assert "## Lineage" not in (runs["A"] / "adapter" / "README.md").read_text()


def test_a_resumed_run_takes_labels_and_lineage_from_its_checkpoint_not_the_moved_earlier_folder(runs: dict[str, Path]) -> None:
    """B, resumed for a second round after A's adapter folder was moved away: the checkpoint holds the arrays,
    and its fedtune.json the labels, the lineage and the initial adapter's digest (server/resume.py)."""
    import shutil

    from click.testing import CliRunner

    from fedtune.cli import main

    resumed = runs["root"] / "B-resumed"
    shutil.copytree(runs["B"], resumed)  # B itself stays as the other tests read it
    moved = runs["A"] / "adapter.moved"
    (runs["A"] / "adapter").rename(moved)
    try:
        result = CliRunner().invoke(main, ["simulate", "--resume", str(resumed), "--rounds", "2",
                                           "--allow-change", "federation.rounds"])
    finally:
        moved.rename(runs["A"] / "adapter")

    assert result.exit_code == 0, result.output[-3000:]
    before = json.loads((runs["B"] / "adapter" / "fedtune.json").read_text())
    after = json.loads((resumed / "adapter" / "fedtune.json").read_text())
    assert (after["labels"], after["lineage"], after["init_adapter"]) == (before["labels"], before["lineage"], before["init_adapter"])
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["init_adapter"]["digest"] == before["init_adapter"]["digest"] == before["lineage"][-1]["digest"]
    # The initial adapter's test score, measured by B's first session, is kept across the resume (checkpoint fedtune.json).
    assert summary["init_adapter"]["test"] == json.loads((runs["B"] / "summary.json").read_text())["init_adapter"]["test"] is not None
    assert [json.loads(line)["round"] for line in (resumed / "metrics.jsonl").read_text().splitlines()] == [1, 2]
