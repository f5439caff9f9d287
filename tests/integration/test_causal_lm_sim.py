"""A causal-LM run end to end: `fedtune simulate --task causal-lm` through Flower's simulation engine
(Ray), 2 sites, 2 rounds, DP on, on the packaged generated clinical-summaries demo with a tiny
Llama built from a config in code; then the adapter loaded with plain PEFT and `fedtune generate`.

Marked slow (one engine start): `make test` runs it; `make test-fast` skips it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.unit.test_causal_lm_run import save_tiny_llama

pytestmark = pytest.mark.slow

TARGET_EPSILON = 8.0


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fedtune.cli import main
    from fedtune.common.causal_lm import load_lm_table
    from fedtune.common.sitedata import demo_data_path

    root = tmp_path_factory.mktemp("lm-sim")
    table = load_lm_table(demo_data_path("clinical_summaries"))
    model = save_tiny_llama(root / "tiny-llama", [m.content for conv in table.conversations for m in conv])
    out = root / "run"
    result = CliRunner().invoke(main, [
        "simulate", "--task", "causal-lm", "--data", "demo:clinical_summaries", "--base-model", str(model),
        "--sites", "2", "--min-sites", "2", "--rounds", "2", "--epsilon", str(TARGET_EPSILON), "--max-length", "96",
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "held-out test: perplexity" in result.output
    return {"run": out, "model": model}


def test_the_summary_carries_test_and_base_perplexity_and_each_site_is_within_its_target(lm_run) -> None:  # type: ignore[no-untyped-def]
    from fedtune.client.ledger import PrivacyLedger

    summary = json.loads((lm_run["run"] / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["dp"] is True and summary["labels"] == []
    test, base = summary["test"], summary["base"]
    assert 1.0 < test["perplexity"] < float("inf") and 1.0 < base["perplexity"] < float("inf")
    assert [s["site"] for s in summary["sites"]] == ["site-0", "site-1"]
    for site in summary["sites"]:
        assert 0 < site["epsilon"] <= TARGET_EPSILON
        assert site["epsilon"] == pytest.approx(TARGET_EPSILON, rel=0.01), "calibrated to land on the target after the planned rounds"
        assert site["statistics"] == "dp" and site["steps"] > 0
        assert site["clip_norm"] == 0.01, "causal-lm's default C (the run sets none), applied at the site"
        ledger = PrivacyLedger(lm_run["run"] / "sites" / site["site"])
        assert {c.kind for c in ledger.charges()} == {"dp-sgd", "statistics"}
        assert len({c.round for c in ledger.charges() if c.kind == "dp-sgd"}) == 2
    lines = [json.loads(x) for x in (lm_run["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    for line in lines:
        assert line["test_perplexity"] is not None and line["test_accuracy"] is None
        assert line["accuracy"] is None and line["loss"] is not None, "sites release a loss, no accuracy"
    assert lines[-1]["test_perplexity"] == pytest.approx(test["perplexity"])
    card = (lm_run["run"] / "adapter" / "README.md").read_text()
    assert "causal-lm" in card and f"**{test['perplexity']:.2f}** with this adapter" in card and "## Labels" not in card


def test_the_adapter_loads_with_plain_peft_and_scores_what_the_summary_says(lm_run) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.common.causal_lm import encode_lm, evaluate_lm, load_lm_tokenizer
    from fedtune.common.config import load_toml
    from fedtune.common.lm_site import load_config_lm_table, simulated_lm_split, subset

    run = load_toml(lm_run["run"] / "config.toml")
    summary = json.loads((lm_run["run"] / "summary.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(lm_run["model"])), str(lm_run["run"] / "adapter")).eval()
    table = load_config_lm_table(run.data)
    test = subset(table, simulated_lm_split(table, run.data, num_sites=2, seed=run.seed).test, "test")
    dataset = encode_lm(load_lm_tokenizer(lm_run["model"]), test, max_length=run.max_length, template=run.data.template).dataset
    assert evaluate_lm(model, dataset).perplexity == pytest.approx(summary["test"]["perplexity"], rel=1e-4)
    with model.disable_adapter():
        assert evaluate_lm(model, dataset).perplexity == pytest.approx(summary["base"]["perplexity"], rel=1e-4)

    generations = [json.loads(x) for x in (lm_run["run"] / "generations.jsonl").read_text().splitlines()]
    held_out = {conv[-2].content: conv[-1].content for conv in test.conversations}
    assert len(generations) == 3 and all(g["prompt"] in held_out and g["reference"] == held_out[g["prompt"]] for g in generations)

    # ROUGE-L: the greedy answers of the tuned and the base model to the first held-out prompts, against their responses.
    from fedtune.common.causal_lm import generate
    from fedtune.common.rouge import mean_rouge_l
    from fedtune.server.lm_eval import GENERATION_MAX_NEW_TOKENS, ROUGE_EXAMPLES

    count = min(ROUGE_EXAMPLES, len(test.conversations))
    assert summary["test"]["rouge_l_examples"] == count
    prompts = [conv[-2].content for conv in test.conversations[:count]]
    references = [conv[-1].content for conv in test.conversations[:count]]
    tokenizer = load_lm_tokenizer(lm_run["model"])
    answer = lambda: generate(model, tokenizer, prompts, max_new_tokens=GENERATION_MAX_NEW_TOKENS, template=run.data.template)  # noqa: E731
    assert mean_rouge_l(answer(), references) == pytest.approx(summary["test"]["rouge_l"])
    with model.disable_adapter():
        assert mean_rouge_l(answer(), references) == pytest.approx(summary["base"]["rouge_l"])
    assert 0.0 <= summary["test"]["rouge_l"] <= 1.0


def test_fedtune_evaluate_reports_the_test_perplexity_of_a_causal_lm_adapter(lm_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.cli import main
    from fedtune.common.config import load_toml
    from fedtune.common.lm_site import load_config_lm_table, simulated_lm_split

    run = load_toml(lm_run["run"] / "config.toml")
    table = load_config_lm_table(run.data)
    rows = [table.conversations[i] for i in simulated_lm_split(table, run.data, num_sites=2, seed=run.seed).test]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"note": c[0].content, "summary": c[1].content}) + "\n" for c in rows), encoding="utf-8")
    result = CliRunner().invoke(main, ["evaluate", "--adapter", str(lm_run["run"] / "adapter"), "--data", str(data),
                                       "--prompt-column", "note", "--response-column", "summary"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = json.loads(result.output.splitlines()[-1])
    summary = json.loads((lm_run["run"] / "summary.json").read_text())
    assert out["perplexity"] == pytest.approx(summary["test"]["perplexity"], rel=1e-4) and out["examples"] == len(rows)


def test_fedtune_generate_continues_prompts_as_the_coordinator_did(lm_run) -> None:  # type: ignore[no-untyped-def]
    from fedtune.cli import main

    generations = [json.loads(x) for x in (lm_run["run"] / "generations.jsonl").read_text().splitlines()]
    prompts = [g["prompt"] for g in generations[:2]]
    result = CliRunner().invoke(main, ["generate", "--adapter", str(lm_run["run"] / "adapter"), "--max-new-tokens", "48", *prompts])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert result.output.splitlines() == [" ".join(g["tuned"].split()) for g in generations[:2]]
    refused = CliRunner().invoke(main, ["predict", "--adapter", str(lm_run["run"] / "adapter"), "some text"])
    assert refused.exit_code != 0 and "use `fedtune generate" in refused.output
