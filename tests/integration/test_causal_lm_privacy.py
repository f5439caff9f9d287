"""A causal LM through the rest of the privacy path, in ONE run of Flower's simulation engine (Ray):
`--task causal-lm` with secure aggregation (SecAgg+), FFA-LoRA (`--aggregation ffa`), heterogeneous
LoRA ranks (`--site-ranks`) and sample-level DP, 2 sites, 1 round, on a tiny Llama built from a
config in code (word-level tokenizer over the data).

What each mechanism must leave behind, checked on the run directory:
- SecAgg+: the round ran the protocol (threshold 2, both sites in the sum, none rejected); the
  summary, the privacy report and the model card say so.
- FFA: every LoRA A of the saved adapter equals the seed-derived initialisation bit for bit (no
  site sent its A, and nothing masked, summed or moved it); B trained.
- Heterogeneous ranks (8 for the run, 4 and 2 for the sites): each site padded its own reply to
  rank 8 with the global adapter before masking, so the rank-8 adapter keeps the global values
  (B = 0 from PEFT's init) in slots 4..7 that no site trained, up to SecAgg+'s quantization error,
  while slots 2..3 (the rank-4 site's) and 0..1 moved.
- DP: each site's epsilon lands on its target after the planned round; its ledger holds the charge.

The exactness of the secure mean against the plain weighted mean of the same sites' replies is
checked without the engine, over real ClientApps (tests/unit/test_causal_lm_aggregation.py), as is
client-level DP's calibration and release for a causal LM.

Marked slow (one engine start): `make test` runs it; `make test-fast` skips it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.common.config import RunConfig, from_dict
from tests.unit.test_causal_lm_run import save_tiny_llama

pytestmark = pytest.mark.slow

TARGET_EPSILON = 8.0
RUN_RANK, SITE_RANKS = 8, (4, 2)
# 60 distinct rows: a fixed response shape, so the words of the vocabulary are few and the run is quick.
ROWS = [(f"note n{k} " + " ".join(["pain"] * (1 + k % 5)) + (" fever" if k % 3 else ""), f"summary s{k % 7} ok")
        for k in range(60)]


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from fedtune.simulations.simulate import run_simulation

    root = tmp_path_factory.mktemp("lm-privacy")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS), encoding="utf-8")
    model = save_tiny_llama(root / "tiny-llama", [t for row in ROWS for t in row])
    run = from_dict({
        "task": "causal-lm",
        "model": {"base_model": str(model), "max_length": 16},
        "lora": {"rank": RUN_RANK, "site_ranks": list(SITE_RANKS), "top_layers": 0},
        "data": {"path": str(data), "template": "plain"},
        "federation": {"sites": 2, "rounds": 1, "min_sites": 2, "aggregation": "ffa"},
        "train": {"batch_size": 16, "physical_batch_size": 8},
        "privacy": {"target_epsilon": TARGET_EPSILON},
        "secure_agg": {"enabled": True},
        "out": str(root / "run"),
    })
    return {"run": run, "dir": run_simulation(run), "model": model}


def _initial(run: RunConfig) -> dict[str, torch.Tensor]:
    """The coordinator's initial global adapter, A included, as it builds it from the run config."""
    from fedtune.common.model import build_run_model

    model = build_run_model(run).model
    return {n.replace(".default.", "."): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_the_secure_round_summed_both_sites_and_every_record_says_so(secure_run) -> None:  # type: ignore[no-untyped-def]
    from fedtune.client.ledger import PrivacyLedger

    run_dir: Path = secure_run["dir"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1]
    line = lines[0]
    assert line["secure_agg"]["protocol"] == "SecAgg+" and line["secure_agg"]["threshold"] == 2, line
    assert line["sites_replied"] == 2 and not line["sites_rejected"], "a site whose reply failed FFA or rank screening is rejected"
    assert line["test_perplexity"] is not None and line["accuracy"] is None

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["secure_aggregation"]["protocol"].startswith("SecAgg+")
    assert 1.0 < summary["test"]["perplexity"] < float("inf") and 1.0 < summary["base"]["perplexity"] < float("inf")
    for site in summary["sites"]:
        assert site["epsilon"] == pytest.approx(TARGET_EPSILON, rel=0.01) and site["epsilon"] <= TARGET_EPSILON
        assert [c.round for c in PrivacyLedger(run_dir / "sites" / site["site"]).charges() if c.kind == "dp-sgd"] == [1]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["secure_aggregation"] == summary["secure_aggregation"]
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "causal-lm" in card and "SecAgg+" in card


def test_ffa_keeps_every_lm_lora_a_at_its_seed_derived_init_and_hetero_ranks_pad_b(secure_run) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    run: RunConfig = secure_run["run"]
    run_dir: Path = secure_run["dir"]
    bound = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["secure_agg"]["quantization_error_bound"]
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == RUN_RANK
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    initial = _initial(run)
    assert saved.keys() == initial.keys()
    lora_a = [k for k in saved if ".lora_A." in k]
    lora_b = [k for k in saved if ".lora_B." in k]
    # q_proj and v_proj of both layers: the LM's inferred targets (v_proj's B is 16 x r: 2 KV heads of 8).
    assert len(lora_a) == len(lora_b) == 4 and {tuple(saved[k].shape) for k in lora_b} == {(32, RUN_RANK), (16, RUN_RANK)}
    for k in lora_a:
        assert saved[k].shape[0] == RUN_RANK and torch.equal(saved[k], initial[k]), f"{k}: A frozen at the seed's value, all {RUN_RANK} rows"
    high, low = SITE_RANKS
    for k in lora_b:
        b = saved[k]
        assert not initial[k].any(), "PEFT's B starts at zero"
        # Slots no site trained: each site padded them with the global value (0); the sum is exact up to quantization.
        assert float(b[:, high:].abs().max()) <= bound + 1e-7, k
        assert float(b[:, low:high].abs().max()) > 10 * bound, f"{k}: the rank-{high} site trained slots {low}..{high - 1}"
        assert float(b[:, :low].abs().max()) > 10 * bound, f"{k}: both sites trained slots 0..{low - 1}"


def test_the_ffa_adapter_loads_with_plain_peft_and_scores_what_the_summary_says(secure_run) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.common.causal_lm import encode_lm, evaluate_lm, load_lm_tokenizer
    from fedtune.common.lm_site import load_config_lm_table, simulated_lm_split, subset

    run: RunConfig = secure_run["run"]
    run_dir: Path = secure_run["dir"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(secure_run["model"])), str(run_dir / "adapter")).eval()
    table = load_config_lm_table(run.data)
    test = subset(table, simulated_lm_split(table, run.data, num_sites=2, seed=run.seed).test, "test")
    dataset = encode_lm(load_lm_tokenizer(secure_run["model"]), test, max_length=run.max_length, template=run.data.template).dataset
    summary = json.loads((run_dir / "summary.json").read_text())
    assert evaluate_lm(model, dataset).perplexity == pytest.approx(summary["test"]["perplexity"], rel=1e-4)
