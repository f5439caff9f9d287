"""A real federated run through Flower's simulation engine (Ray), with a tiny model.

Marked slow (about a minute): `make test` runs it; `make test-fast` skips it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.common.config import from_dict
from fedtune.common.model import adapter_state, build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedtune.simulations.simulate import run_simulation

    out = tmp_path_factory.mktemp("sim") / "run"
    run = from_dict(
        {
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "federation": {"sites": 2, "rounds": 2, "min_sites": 2},
            "privacy": {"target_epsilon": 8.0},
            "out": str(out),
        }
    )
    return run_simulation(run)


def test_run_directory_is_complete(run_dir: Path) -> None:
    for name in ("adapter", "checkpoints/round-1", "checkpoints/round-2", "metrics.jsonl", "summary.json", "config.toml", "report.png",
                 "privacy.json", "privacy.png"):
        assert (run_dir / name).exists(), name
    for folder in ("adapter", "checkpoints/round-1"):
        assert (run_dir / folder / "adapter_config.json").is_file()
        assert (run_dir / folder / "adapter_model.safetensors").is_file()


def test_adapter_folder_carries_a_model_card_with_the_privacy_guarantee(run_dir: Path) -> None:
    card = (run_dir / "adapter" / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "differential privacy" in card.lower()
    assert all(label in card for label in summary["labels"])
    assert "site-0" in card and "site-1" in card


def test_metrics_recorded_once_per_round(run_dir: Path) -> None:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    for line in lines:
        assert line["sites_sampled"] == 2 and line["sites_replied"] == 2
        assert line["accuracy"] is not None and line["test_accuracy"] is not None
        assert line["validated_round"] == line["round"] - 1, "sites validate the adapter they receive"
        assert line["bytes_up"] > 0 and line["seconds"] > 0
        assert 0 < line["max_epsilon"] <= 8.0


def test_each_site_epsilon_is_positive_and_within_target(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dp"] is True
    assert [s["site"] for s in summary["sites"]] == ["site-0", "site-1"]
    for site in summary["sites"]:
        assert 0 < site["epsilon"] <= 8.0
        assert site["epsilon"] == pytest.approx(8.0, rel=0.01), "calibrated to land on the target after the planned rounds"
        assert site["noise_multiplier"] > 0 and site["steps"] > 0 and 0 < site["sample_rate"] <= 1
    for key in ("rounds", "base_model", "task", "labels", "test", "bytes_up", "bytes_down", "seconds"):
        assert key in summary
    assert set(summary["test"]) == {"accuracy", "macro_f1"}
    assert summary["validation"]["round"] == 2 and summary["validation"]["sites"] == 2, "the final adapter is validated too"
    assert 0 <= summary["validation"]["accuracy"] <= 1


def test_site_ledgers_live_in_the_run_directory_and_match_the_summary(run_dir: Path) -> None:
    from fedtune.client.ledger import PrivacyLedger

    summary = {s["site"]: s for s in json.loads((run_dir / "summary.json").read_text())["sites"]}
    for name, site in summary.items():
        ledger = PrivacyLedger(run_dir / "sites" / name)
        charges = ledger.charges()
        assert [c.round for c in charges if c.kind == "dp-sgd"] == [1, 2]
        # Validation of the received adapter each round and of the final one, under DP (the simulation default).
        assert [c.kind for c in charges].count("statistics") == 3 and site["statistics"] == "dp"
        # The site's guarantee is the max over its records, trained and validated.
        assert ledger.summary(delta=site["delta"]).max_epsilon == pytest.approx(site["epsilon"])


def test_global_adapter_changed_and_loads_with_peft(run_dir: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel

    from fedtune.common.model import load_classifier

    summary = json.loads((run_dir / "summary.json").read_text())
    run = from_dict({"model": {"base_model": str(tiny_model_dir), "max_length": 32}})
    initial = adapter_state(build_model(run.model, run.lora, len(summary["labels"]), seed=run.seed).model)

    # The head reads the pooling the run used, as recorded beside the adapter.
    pooling = json.loads((run_dir / "adapter" / "fedtune.json").read_text())["pooling"]
    assert pooling == run.model.pooling
    base = load_classifier(tiny_model_dir, len(summary["labels"]), pooling=pooling)
    loaded = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    final = adapter_state(loaded)

    assert final.keys() == initial.keys()
    changed = [k for k in final if not torch.allclose(final[k], initial[k])]
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)


def test_cli_evaluate_and_predict_use_the_trained_adapter(run_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main
    from fedtune.common.sitedata import demo_data_path

    runner = CliRunner()
    out_json = tmp_path / "eval.json"
    result = runner.invoke(main, ["evaluate", "--adapter", str(run_dir / "adapter"), "--data", str(demo_data_path()), "--json", str(out_json)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out_json.read_text())
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1 and metrics["examples"] == 1500

    result = runner.invoke(main, ["predict", "--adapter", str(run_dir / "adapter"), "chest pain radiating to the left arm", "sudden numbness"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.strip().splitlines()[-2:]]
    labels = json.loads((run_dir / "summary.json").read_text())["labels"]
    assert all(row[0] in labels and 0 < float(row[1]) <= 1 for row in rows)


def test_existing_run_directory_is_not_overwritten(run_dir: Path, tiny_model_dir: Path) -> None:
    from fedtune.common.errors import ConfigError
    from fedtune.simulations.simulate import run_simulation

    run = from_dict({"model": {"base_model": str(tiny_model_dir)}, "federation": {"sites": 2, "rounds": 1}, "out": str(run_dir)})
    with pytest.raises(ConfigError, match="already holds a run"):
        run_simulation(run)


def test_client_level_dp_run_records_its_guarantee(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.server.client_dp_plan import client_level_epsilon
    from fedtune.simulations.simulate import run_simulation

    run = from_dict(
        {
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "federation": {"sites": 2, "rounds": 1, "min_sites": 2},
            "client_dp": {"enabled": True, "target_epsilon": 5.0, "clip_norm": 0.5},
            "out": str(tmp_path / "cdp"),
        }
    )
    run_dir = run_simulation(run)

    client = json.loads((run_dir / "summary.json").read_text())["client_level"]
    assert client["clip_norm"] == 0.5 and client["expected_sites"] == 2 and client["sample_rate"] == 1.0
    assert client["epsilon"] <= 5.0
    assert client["epsilon"] == pytest.approx(client_level_epsilon(sample_rate=1.0, noise_multiplier=client["noise_multiplier"], rounds=1, delta=1e-5))
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["client_dp"]["client-dp-sites"] == 2 and line["client_dp"]["client-dp-noise-std"] > 0


def test_secure_aggregation_run_matches_the_plain_run(run_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same run with SecAgg+ through Flower's engine: the same global adapter, up to quantization."""
    from safetensors.numpy import load_file

    from fedtune.simulations.simulate import run_simulation

    run = from_dict(
        {
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "federation": {"sites": 2, "rounds": 2, "min_sites": 2},
            "privacy": {"target_epsilon": 8.0},
            "secure_agg": {"enabled": True},
            "out": str(tmp_path / "secure"),
        }
    )
    secure_dir = run_simulation(run)

    lines = [json.loads(x) for x in (secure_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    for line in lines:
        assert line["secure_agg"]["protocol"] == "SecAgg+" and line["secure_agg"]["threshold"] == 2
        assert line["sites_replied"] == 2 and not line["sites_rejected"]
        assert 0 < line["max_epsilon"] <= 8.0
    bound = lines[0]["secure_agg"]["quantization_error_bound"]
    assert bound < 1e-5
    plain = load_file(str(run_dir / "checkpoints" / "round-1" / "adapter_model.safetensors"))
    secure = load_file(str(secure_dir / "checkpoints" / "round-1" / "adapter_model.safetensors"))
    assert plain.keys() == secure.keys()
    # float32 FedAvg on one side, float64 unmasking on the other: quantization plus float32 rounding.
    assert max(float(abs(plain[k] - secure[k]).max()) for k in plain) <= bound + 1e-6
    summary = json.loads((secure_dir / "summary.json").read_text())
    assert summary["secure_aggregation"]["protocol"].startswith("SecAgg+")


def test_ffa_run_exchanges_only_b_and_the_head_and_saves_the_seed_derived_a(run_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """FFA-LoRA through Flower's engine: every site builds the frozen A from the run config alone, so
    its reply passes the coordinator's screening for B and the head; the saved adapter holds A."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from fedtune.common.model import load_classifier, uses_ffa
    from fedtune.simulations.simulate import run_simulation

    run = from_dict(
        {
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "federation": {"sites": 2, "rounds": 1, "min_sites": 2, "aggregation": "ffa", "fraction_evaluate": 0.0},
            "privacy": {"target_epsilon": 8.0},
            "out": str(tmp_path / "ffa"),
        }
    )
    ffa_dir = run_simulation(run)

    line = json.loads((ffa_dir / "metrics.jsonl").read_text().splitlines()[0])
    plain = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    # A site that sent its A (or built another model) would be rejected here.
    assert line["sites_replied"] == 2 and not line["sites_rejected"]
    assert line["bytes_up"] < 0.6 * plain["bytes_up"], (line["bytes_up"], plain["bytes_up"])
    labels = json.loads((ffa_dir / "summary.json").read_text())["labels"]
    model = build_model(run.model, run.lora, len(labels), seed=run.seed, ffa=uses_ffa(run)).model
    frozen = {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".lora_A." in n}
    saved = load_file(str(ffa_dir / "adapter" / "adapter_model.safetensors"))
    assert frozen and all(torch.equal(saved[n], a) for n, a in frozen.items())
    initial = adapter_state(model)
    assert any(not torch.equal(saved[k], initial[k]) for k in initial if ".lora_B." in k), "B trained"
    PeftModel.from_pretrained(load_classifier(tiny_model_dir, len(labels), pooling=run.model.pooling), str(ffa_dir / "adapter"))


def test_ffa_under_secure_aggregation_keeps_a_frozen_and_trains_b(tiny_model_dir: Path, tmp_path: Path) -> None:
    """FFA-LoRA through SecAgg+: the masked vectors carry B and the head only (the coordinator sees
    their sum), and the saved adapter holds the seed-derived A bit for bit, with B trained."""
    from safetensors.torch import load_file

    from fedtune.common.model import uses_ffa
    from fedtune.simulations.simulate import run_simulation

    run = from_dict(
        {
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "federation": {"sites": 2, "rounds": 1, "min_sites": 2, "aggregation": "ffa", "fraction_evaluate": 0.0},
            "privacy": {"target_epsilon": 8.0},
            "secure_agg": {"enabled": True},
            "out": str(tmp_path / "ffa-secure"),
        }
    )
    out = run_simulation(run)

    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["secure_agg"]["protocol"] == "SecAgg+" and line["sites_replied"] == 2 and not line["sites_rejected"], line
    labels = json.loads((out / "summary.json").read_text())["labels"]
    model = build_model(run.model, run.lora, len(labels), seed=run.seed, ffa=uses_ffa(run)).model
    frozen = {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".lora_A." in n}
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert frozen and all(torch.equal(saved[n], a) for n, a in frozen.items()), "A is frozen: never masked, summed or moved"
    initial = adapter_state(model)
    bound = line["secure_agg"]["quantization_error_bound"]
    lora_b = [k for k in initial if ".lora_B." in k]
    assert lora_b and any(float((saved[k] - initial[k]).abs().max()) > 10 * bound for k in lora_b), "B trained"


def test_heterogeneous_rank_run_pads_lower_rank_replies_and_keeps_the_runs_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    """lora.site_ranks through Flower's engine: sites of rank 4 and 2 in a rank-8 run. Both replies
    pass screening and are padded with the global adapter's values, so the saved rank-8 adapter
    keeps the initial global adapter in slots 4..7 (no site trained them: PEFT's random A rows,
    B's zero columns), and slots 2..3 move by the rank-4 site's change alone (weighted), the rank-2
    site's update being zero there. Zero padding would have zeroed A's rows 4..7."""
    from peft import PeftModel

    from fedtune.common.model import load_classifier
    from fedtune.simulations.simulate import run_simulation

    run = from_dict(
        {
            "model": {"base_model": str(tiny_model_dir), "max_length": 32},
            "lora": {"rank": 8, "site_ranks": [4, 2]},
            "federation": {"sites": 2, "rounds": 1, "min_sites": 2, "fraction_evaluate": 0.0},
            "privacy": {"target_epsilon": 8.0},
            "out": str(tmp_path / "hetero"),
        }
    )
    het_dir = run_simulation(run)

    lines = [json.loads(x) for x in (het_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1]
    assert lines[0]["sites_replied"] == 2 and not lines[0]["sites_rejected"], lines[0]
    assert json.loads((het_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    labels = json.loads((het_dir / "summary.json").read_text())["labels"]
    # The coordinator's initial adapter, rebuilt from the run's seed as the coordinator builds it.
    initial = adapter_state(build_model(run.model, run.lora, len(labels), seed=run.seed).model)
    saved = adapter_state(PeftModel.from_pretrained(load_classifier(tiny_model_dir, len(labels), pooling=run.model.pooling),
                                                    str(het_dir / "adapter")))
    assert saved.keys() == initial.keys()
    lora_a = [k for k in saved if ".lora_A." in k]
    lora_b = [k for k in saved if ".lora_B." in k]
    assert lora_a and lora_b
    for k in lora_a:
        a, a0 = saved[k], initial[k]
        assert a.shape[0] == 8 and a0[4:].abs().min() > 0, "PEFT's A starts random in every slot"
        # FedAvg of two equal values, w1 x + w2 x in float32: the initial value up to rounding.
        assert torch.allclose(a[4:], a0[4:], rtol=1e-6, atol=0), k
        assert not torch.allclose(a[2:4], a0[2:4], rtol=1e-4, atol=0), f"{k}: the rank-4 site trained slots 2..3"
    for k in lora_b:
        b, b0 = saved[k], initial[k]
        assert b.shape[1] == 8 and not b0.any() and not b[:, 4:].any() and b[:, 2:4].any(), k
