"""Starting a run from an earlier adapter (``model.init_adapter``): checks, head growth, lineage, ledgers.

Real PEFT models on a tiny BERT and real adapter folders written by ``save_adapter``; no engine.
The end-to-end run (first-round validation, ledgers across two simulations, the card) is
tests/integration/test_init_adapter_sim.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fedtune.common.config import RunConfig, from_dict
from fedtune.common.errors import ConfigError, PrivacyBudgetError
from fedtune.common.init_adapter import (
    CONTINUED_LEDGERS_FILE,
    check_fits,
    labels_with_earlier,
    load_initial_adapter,
    read_earlier_adapter,
)
from fedtune.common.model import adapter_state, build_run_model, save_adapter

LABELS = ["a", "b", "c"]


def _run(tiny: Path, **sections: dict) -> RunConfig:  # type: ignore[type-arg]
    base = {"model": {"base_model": str(tiny), "max_length": 16}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return from_dict(base)


def _save(tiny: Path, folder: Path, *, run: RunConfig, labels: list[str], meta: dict | None = None) -> Path:  # type: ignore[type-arg]
    """An adapter folder as a run leaves it, with non-zero LoRA B and a non-fresh head (B = 0 hides bugs)."""
    bundle = build_run_model(run, len(labels))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if p.requires_grad:  # B, the head (and A unless FFA froze it)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    save_adapter(bundle.model, folder, metadata={"task": run.task, "labels": labels, "max_length": run.max_length,
                                                 "base_model": str(tiny), **(meta or {})})
    return folder


@pytest.fixture(scope="module")
def earlier_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runA/adapter, inside a run directory that names its run id."""
    run_dir = tmp_path_factory.mktemp("runA")
    (run_dir / "run.json").write_text(json.dumps({"run_id": "1111"}))
    ancestor = {"run_id": "0000", "adapter": "/old/adapter", "digest": "sha256:" + "0" * 64, "epsilon": 1.5}
    return _save(tiny_model_dir, run_dir / "adapter", run=_run(tiny_model_dir), labels=LABELS,
                 meta={"run_id": "1111", "epsilon": 2.25, "simulation": False, "lineage": [ancestor]})


def test_a_new_label_grows_the_head_keeping_the_earlier_rows_and_starting_the_new_one_fresh(tiny_model_dir: Path, earlier_dir: Path) -> None:
    # Prepare
    run = _run(tiny_model_dir, data={"labels": ["a", "b", "c", "d"]})
    earlier = read_earlier_adapter(earlier_dir)
    labels = labels_with_earlier(earlier, list(run.data.labels), explicit=True)
    bundle = build_run_model(run, len(labels))
    fresh = adapter_state(build_run_model(run, len(labels)).model)  # what a fresh head at this seed is, built apart
    # Execute
    init = load_initial_adapter(earlier, bundle, run, labels)
    state = adapter_state(bundle.model)
    # Assert
    from safetensors.torch import load_file

    saved = load_file(str(earlier_dir / "adapter_model.safetensors"))
    head = "base_model.model.classifier.weight"
    assert init.labels_added == ("d",)
    assert state[head].shape == (4, saved[head].shape[1])
    assert torch.equal(state[head][:3], saved[head]), "existing labels keep their rows"
    assert torch.equal(state[head][3], fresh[head][3]), "the new row starts as a fresh head's would"
    assert torch.equal(state["base_model.model.classifier.bias"][:3], saved["base_model.model.classifier.bias"])
    for name, value in saved.items():
        if "lora_" in name:
            assert torch.equal(state[name], value), name

    # ... and training runs on it, the new label's row included (real Opacus DP-SGD).
    from fedtune.client.train import DPSettings, StepPlan, train_local
    from fedtune.common.model import load_tokenizer
    from fedtune.common.tasks import encode

    texts = [f"note {i} about {lab}" for i in range(8) for lab in labels]
    ys = [lab for _ in range(8) for lab in labels]
    dataset = encode(load_tokenizer(run.model), texts, ys, labels, max_length=16)
    result = train_local(bundle.model, dataset, train=run.train, plan=StepPlan(sample_rate=0.5, steps=3),
                         dp=DPSettings(noise_multiplier=0.5, clip_norm=1.0), seed=3, learning_rate=0.05)
    after = adapter_state(bundle.model)
    assert torch.isfinite(torch.tensor(result.loss))
    assert not torch.equal(after[head][3], state[head][3]), "the new label's row trains"


def test_labels_found_in_the_data_are_reordered_so_earlier_ones_keep_their_indexes(earlier_dir: Path) -> None:
    earlier = read_earlier_adapter(earlier_dir)
    assert labels_with_earlier(earlier, ["a", "aa", "b", "c", "z"], explicit=False) == ["a", "b", "c", "aa", "z"]


def test_data_labels_that_reorder_the_earlier_ones_are_refused(earlier_dir: Path) -> None:
    earlier = read_earlier_adapter(earlier_dir)
    with pytest.raises(ConfigError, match=r"reorders them.*\['a', 'b', 'c', 'd'\]"):
        labels_with_earlier(earlier, ["b", "a", "c", "d"], explicit=True)


def test_a_removed_label_is_refused_naming_it(earlier_dir: Path) -> None:
    earlier = read_earlier_adapter(earlier_dir)
    with pytest.raises(ConfigError, match=r"lack \['c'\]") as err:
        labels_with_earlier(earlier, ["a", "b"], explicit=False)
    assert "renamed to" not in str(err.value)
    with pytest.raises(ConfigError, match=r"lack \['c'\]; renamed to \['x'\]\?"):
        labels_with_earlier(earlier, ["a", "b", "x"], explicit=True)


def test_another_base_model_is_refused_naming_both_ids(earlier_dir: Path, tmp_path: Path) -> None:
    from fedtune.common.tiny import make_tiny_bert

    other = make_tiny_bert(tmp_path / "other", hidden_size=48)
    run = _run(other)
    expected = hashlib.sha256((other / "config.json").read_bytes()).hexdigest()[:16]
    found = json.loads((earlier_dir / "fedtune.json").read_text())["base_model_id"]
    assert found != expected
    with pytest.raises(ConfigError) as err:
        check_fits(read_earlier_adapter(earlier_dir), run, LABELS)
    assert f"config id {found}" in str(err.value) and f"config id {expected}" in str(err.value)


def test_another_task_is_refused_naming_both(tiny_model_dir: Path, earlier_dir: Path) -> None:
    run = from_dict({"task": "causal-lm", "model": {"base_model": str(tiny_model_dir), "max_length": 16}})
    with pytest.raises(ConfigError, match=r"trained for task 'classification'; this run's task is 'causal-lm'"):
        check_fits(read_earlier_adapter(earlier_dir), run, [])


def test_another_lora_shape_or_pooling_is_refused_naming_each_difference(tiny_model_dir: Path, earlier_dir: Path) -> None:
    run = _run(tiny_model_dir, lora={"rank": 4, "alpha": 4.0, "target_modules": ["query"]}, model={"pooling": "cls"})
    with pytest.raises(ConfigError) as err:
        check_fits(read_earlier_adapter(earlier_dir), run, LABELS)
    text = str(err.value)
    for part in ("LoRA rank 8; this run's lora.rank is 4", "LoRA alpha 2.0; this run's lora.alpha is 4.0",
                 "adapts the modules ['query', 'value']; this run's lora.target_modules are ['query']",
                 "pooling 'mean'; this run's model.pooling is 'cls'"):
        assert part in text, part


def test_ffa_refuses_an_adapter_whose_a_is_not_its_seed_derived_one(tiny_model_dir: Path, earlier_dir: Path, tmp_path: Path) -> None:
    ffa = _run(tiny_model_dir, federation={"aggregation": "ffa"})
    with pytest.raises(ConfigError, match=r"'ffa' freezes every LoRA A at values derived from seed 0.*aggregation is not recorded"):
        check_fits(read_earlier_adapter(earlier_dir), ffa, LABELS)
    # An FFA adapter continues under FFA at its seed, and under FedAvg (which trains A); not at another seed.
    folder = _save(tiny_model_dir, tmp_path / "ffa-adapter", run=ffa, labels=LABELS, meta={"aggregation": "ffa", "seed": 0})
    earlier = read_earlier_adapter(folder)
    check_fits(earlier, ffa, LABELS)
    load_initial_adapter(earlier, build_run_model(ffa, 3), ffa, LABELS)
    check_fits(earlier, _run(tiny_model_dir), LABELS)
    with pytest.raises(ConfigError, match=r"seed 5.*aggregation 'ffa', seed 0"):
        check_fits(earlier, from_dict({**ffa.to_dict(), "seed": 5}), LABELS)


def test_lineage_carries_the_ancestors_and_adds_the_earlier_run_with_its_digest(earlier_dir: Path) -> None:
    earlier = read_earlier_adapter(earlier_dir)
    digest = "sha256:" + hashlib.sha256((earlier_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    # Named portably: the run directory's name and the folder in it, never the coordinator's absolute path (an
    # ancestor recorded with one by an older fedtune keeps only its last components).
    assert [e.to_json() for e in earlier.lineage] == [
        {"run_id": "0000", "adapter": "old/adapter", "digest": "sha256:" + "0" * 64, "epsilon": 1.5},
        {"run_id": "1111", "adapter": f"{earlier_dir.parent.name}/adapter", "digest": digest, "epsilon": 2.25},
    ]


def test_a_checkpoint_round_outside_its_run_directory_is_named_by_its_last_folders() -> None:
    from fedtune.common.init_adapter import portable_name

    assert portable_name("/srv/coordinator/runs/runA/checkpoints/round-3") == "runA/checkpoints/round-3"
    assert portable_name("/home/ml/adapters/triage-v2") == "triage-v2"
    assert portable_name("runA/adapter") == "runA/adapter"


def test_a_resumed_run_reads_the_initial_adapter_from_its_checkpoints_metadata(earlier_dir: Path, tmp_path: Path) -> None:
    from fedtune.common.init_adapter import initial_from_metadata

    earlier = read_earlier_adapter(earlier_dir)
    meta = {"labels": LABELS + ["d"], "lineage": [e.to_json() for e in earlier.lineage],
            "init_adapter": {"digest": earlier.lineage[-1].digest, "earlier_labels": LABELS, "labels_added": ["d"]}}
    meta = json.loads(json.dumps(meta))  # as fedtune.json holds it (lists, not tuples)

    init = initial_from_metadata(meta, folder=tmp_path / "gone", where="round-1/fedtune.json")

    assert init is not None and init.lineage == earlier.lineage and init.earlier_labels == tuple(LABELS)
    assert init.labels_added == ("d",) and init.digest == earlier.lineage[-1].digest
    assert initial_from_metadata({"labels": LABELS}, folder=tmp_path, where="x") is None  # an older checkpoint: read the folder
    with pytest.raises(ConfigError, match="lineage does not end with"):
        initial_from_metadata({**meta, "lineage": meta["lineage"][:1]}, folder=tmp_path, where="x")


def test_a_folder_that_is_not_an_adapter_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"init_adapter.*has no adapter_config.json"):
        read_earlier_adapter(tmp_path)


def test_the_card_lists_the_lineage_with_each_epsilon() -> None:
    from fedtune.server.report import model_card

    summary = {"dp": True, "sites": [], "labels": LABELS, "rounds": 1, "privacy": {"accountant": "rdp"}}
    card = model_card(summary, lineage=[{"run_id": "1111", "adapter": "/x", "digest": "sha256:abcdef0123456789ff", "epsilon": 2.251}])
    assert "## Lineage" in card
    assert "| 1111 | `abcdef0123456789` | 2.26 |" in card, "epsilon rounded up, never below the accounted one"
    assert "## Lineage" not in model_card(summary)


# -- simulated sites' ledgers across runs -------------------------------------------------------------
def _charge(state_dir: Path, records: list[str], *, run: str, z: float) -> None:
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.accounting import Segment

    PrivacyLedger(state_dir).charge(records, run=run, round=1, segment=Segment(sample_rate=0.1, noise_multiplier=z, steps=50),
                                    clip_norm=1.0, delta=1e-5, budget_epsilon=100.0)


def test_new_sites_continue_every_earlier_ledger_and_the_sources_are_only_read(tmp_path: Path) -> None:
    from dp_accounting import dp_event, rdp

    from fedtune.client.ledger import PrivacyLedger
    from fedtune.simulations.simulate import continue_site_ledgers

    # Prepare: run A's two sites; site-1's record "r3" moves to site-0 in the new split.
    earlier = tmp_path / "runA" / "sites"
    _charge(earlier / "site-0", ["r0", "r1"], run="A", z=1.0)
    _charge(earlier / "site-1", ["r2", "r3"], run="A", z=0.8)
    before = {p: p.read_bytes() for p in earlier.rglob("privacy-ledger.json")}
    new = tmp_path / "runB"
    # Execute
    marker = continue_site_ledgers(earlier, new, sites=2, budget_epsilon=50.0, delta=1e-5)
    continue_site_ledgers(earlier, new, sites=2, budget_epsilon=50.0, delta=1e-5)  # a rerun adds nothing
    # Assert: the earlier ledgers are untouched; each new site's records carry what they spent, wherever they were.
    assert {p: p.read_bytes() for p in earlier.rglob("privacy-ledger.json")} == before
    assert json.loads(marker.read_text())["runs"] == ["A"] and marker.name == CONTINUED_LEDGERS_FILE

    def independent(z: float) -> float:  # Google's dp-accounting, not fedtune's accountant
        acc = rdp.RdpAccountant()
        acc.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z)), 50)
        return acc.get_epsilon(1e-5)

    site0 = PrivacyLedger(new / "sites" / "site-0")
    assert len(site0.charges()) == 2
    for record, where in (("r0", "site-0"), ("r3", "site-1")):
        assert site0.spent_epsilon([record], delta=1e-5) == PrivacyLedger(earlier / where).spent_epsilon([record], delta=1e-5)
    # 1%: dp-accounting's default RDP orders are a coarser grid than fedtune's.
    assert site0.spent_epsilon(["r0"], delta=1e-5) == pytest.approx(independent(1.0), rel=1e-2)
    assert site0.spent_epsilon(["r3"], delta=1e-5) == pytest.approx(independent(0.8), rel=1e-2)
    assert site0.spent_epsilon(["new-row"], delta=1e-5) == 0.0


def test_an_earlier_spend_at_the_budget_is_refused_before_any_ledger_is_written(tmp_path: Path) -> None:
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.simulations.simulate import continue_site_ledgers

    earlier = tmp_path / "runA" / "sites"
    _charge(earlier / "site-0", ["r0"], run="A", z=1.0)
    spent = PrivacyLedger(earlier / "site-0").spent_epsilon(["r0"], delta=1e-5)
    with pytest.raises(PrivacyBudgetError, match=r"raise privacy.target_epsilon above"):
        continue_site_ledgers(earlier, tmp_path / "runB", sites=2, budget_epsilon=spent, delta=1e-5)
    assert not (tmp_path / "runB").exists()


def test_simulate_refuses_an_unfit_adapter_before_any_process_starts(tiny_model_dir: Path, earlier_dir: Path, tmp_path: Path) -> None:
    from fedtune.simulations.simulate import run_simulation

    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(40)))
    out = tmp_path / "runB"
    run = _run(tiny_model_dir, data={"path": str(data)}, model={"init_adapter": str(earlier_dir)})
    run = from_dict({**run.to_dict(), "out": str(out)})
    with pytest.raises(ConfigError, match=r"lack \['c'\]"):
        run_simulation(run)
    assert not out.exists(), "refused before the run directory or any site"


def test_the_init_adapter_flag_reaches_the_preflight_and_its_refusal_names_the_difference(
        tiny_model_dir: Path, earlier_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main

    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"row {i},{'abx'[i % 3]}\n" for i in range(60)))
    out = tmp_path / "runB"
    result = CliRunner().invoke(main, ["simulate", "--init-adapter", str(earlier_dir), "--data", str(data), "--base-model",
                                       str(tiny_model_dir), "--out", str(out)])
    assert result.exit_code != 0
    assert "lack ['c']; renamed to ['x']?" in result.output
    assert not out.exists()


def test_other_adapted_layers_are_refused_naming_both(tiny_model_dir: Path, earlier_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"adapts the layers \[0, 1\]; this run's lora.top_layers = 1 adapts \[1\]"):
        check_fits(read_earlier_adapter(earlier_dir), _run(tiny_model_dir, lora={"top_layers": 1}), LABELS)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders ``read_earlier_adapter`` is called with from here on: a spy around the real reader."""
    import fedtune.common.init_adapter as init_adapter

    calls: list[Path] = []
    real = init_adapter.read_earlier_adapter

    def counted(folder):  # type: ignore[no-untyped-def]
        calls.append(Path(folder))
        return real(folder)

    monkeypatch.setattr(init_adapter, "read_earlier_adapter", counted)
    return calls


def test_simulate_reads_the_earlier_adapter_once_from_flag_to_run(
        tiny_model_dir: Path, earlier_dir: Path, tmp_path: Path, reads: list[Path]) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main

    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"row {i},{'abc'[i % 3]}\n" for i in range(60)))
    out = tmp_path / "runB"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")  # run_simulation stops at the used directory, after the preflight, before any process

    result = CliRunner().invoke(main, ["simulate", "--init-adapter", str(earlier_dir), "--data", str(data), "--base-model",
                                       str(tiny_model_dir), "--max-length", "16", "--out", str(out)])

    assert result.exit_code != 0 and "already holds a run" in result.output, result.output
    assert reads == [earlier_dir], "the CLI's preflight read it; run_simulation took what it read"


def test_the_coordinator_reads_the_earlier_adapter_once_and_checks_one_it_was_given_as_its_own(
        tiny_model_dir: Path, earlier_dir: Path, tmp_path: Path, reads: list[Path]) -> None:
    import dataclasses

    from fedtune.server.app import _earlier_adapter

    deployed = from_dict({**_run(tiny_model_dir, model={"init_adapter": str(earlier_dir)}).to_dict(), "simulation": False})

    # Deployment: no preflight, so the coordinator reads the folder itself, once.
    read = _earlier_adapter(deployed, tmp_path, resumed=False)
    assert reads == [earlier_dir] and read is not None and read.folder == earlier_dir

    # Simulation: the preflight's read is taken as it is, and still checked: a simulated earlier run's
    # sites' ledgers must have been continued (the marker) before the coordinator starts.
    simulated = _run(tiny_model_dir, model={"init_adapter": str(earlier_dir)})
    assert _earlier_adapter(simulated, tmp_path, resumed=False, read=read) is read
    from_simulation = dataclasses.replace(read, meta={**read.meta, "simulation": True})
    with pytest.raises(ConfigError, match=CONTINUED_LEDGERS_FILE):
        _earlier_adapter(simulated, tmp_path, resumed=False, read=from_simulation)
    (tmp_path / CONTINUED_LEDGERS_FILE).write_text("{}")
    assert _earlier_adapter(simulated, tmp_path, resumed=False, read=from_simulation) is from_simulation
    assert reads == [earlier_dir], "nothing was read again"

    # A read of another folder, or for a run without an earlier adapter, is a caller's mistake.
    with pytest.raises(ValueError, match="not this run's model.init_adapter"):
        _earlier_adapter(simulated, tmp_path, resumed=False, read=dataclasses.replace(read, folder=tmp_path))
    with pytest.raises(ValueError, match="without model.init_adapter"):
        _earlier_adapter(_run(tiny_model_dir), tmp_path, resumed=False, read=read)
