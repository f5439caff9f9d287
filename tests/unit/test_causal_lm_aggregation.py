"""A causal LM's adapter through secure aggregation and client-level DP, without the simulation engine.

Real ClientApps of two simulated sites train a tiny Llama (built from a config in code) with Opacus
DP-SGD and PEFT; messages travel through the in-process grid of tests/unit/test_secure_agg.py (the
transport is the only stand-in: Flower's SecAgg+ workflow and mod, fedtune's bridges, the round loop
and the ServerApp's run are real). Simulated sites are reproducible (their seeds derive from the run's
seed, the site's name and the round), so the same round served twice gives the same replies: one
serving is the oracle's input, the other goes through the mechanism under test.

Oracles are written here in NumPy: the padded, example-weighted mean of the plain replies (SecAgg+),
and clip-to-C, sum / m of the sites' deltas (client-level DP) with the residual checked against
N(0, (z C / m)^2); the client-level epsilon against Google's dp-accounting.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, RecordDict

from fedtune.common.config import RunConfig, from_dict
from fedtune.common.messages import RoundInstructions
from tests.unit.test_causal_lm_run import save_tiny_llama
from tests.unit.test_secure_agg import InProcessGrid, _messages

pytestmark = pytest.mark.usefixtures("flower_task_identity")

NODES = [1, 2]
# 48 distinct rows of one response shape: a small vocabulary, 16 tokens at most (plain template).
ROWS = [(f"note n{k} " + " ".join(["pain"] * (1 + k % 5)) + (" fever" if k % 3 else ""), f"summary s{k % 7} ok") for k in range(48)]


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm-agg")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS), encoding="utf-8")
    return {"data": data, "model": save_tiny_llama(root / "tiny-llama", [t for row in ROWS for t in row])}


def _run(files: dict[str, Path], out: Path | None = None, **sections: dict[str, Any]) -> RunConfig:
    base: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"base_model": str(files["model"]), "max_length": 16},
        "lora": {"rank": 4, "top_layers": 0},
        "data": {"path": str(files["data"]), "template": "plain"},
        "federation": {"sites": 2, "rounds": 1, "min_sites": 2, "fraction_evaluate": 0.0},
        "train": {"batch_size": 16, "physical_batch_size": 8},
        "privacy": {"target_epsilon": 8.0},
        "out": str(out or ""),
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return from_dict(base)


def _contexts(run: RunConfig) -> dict[int, Context]:
    """Two simulated sites, as the engine describes them to the ClientApp (partition-id, num-partitions)."""
    return {n: Context(run_id=7, node_id=n, node_config={"partition-id": n - 1, "num-partitions": len(NODES)}, state=RecordDict(),
                       run_config=run.to_flat()) for n in NODES}


def _config(run_dir: Path) -> dict[str, Any]:
    return dict(RoundInstructions(server_round=1, num_rounds=1, labels=(), run_dir=str(run_dir)).to_config())


def _plain_replies(run: RunConfig, initial: ArrayRecord, run_dir: Path) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
    """Each site's plain reply to round 1 (its own run directory: fresh ledgers): site -> (weight, arrays)."""
    replies = InProcessGrid(_contexts(run)).send_and_receive(_messages(NODES, initial, _config(run_dir)))
    assert len(replies) == len(NODES) and not any(m.has_error() for m in replies)
    return {str(m.content.config_records["site"]["name"]): (int(m.content["metrics"]["num-examples"]),
                                                             {k: v.numpy().astype(np.float64) for k, v in m.content["arrays"].items()})
            for m in replies}


def _pad(reply: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The oracle's padding, slot by slot: the global value wherever the reply has no rank slot."""
    out = {}
    for name, g in glob.items():
        value, padded = reply[name], g.astype(np.float64).copy()
        if ".lora_A." in name:
            padded[: value.shape[0]] = value
        elif ".lora_B." in name:
            padded[:, : value.shape[1]] = value
        else:
            padded = value
        out[name] = padded
    return out


def test_secagg_of_ffa_lm_replies_at_mixed_ranks_is_the_padded_weighted_mean_of_the_plain_replies(lm_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.common.model import adapter_state, build_run_model
    from fedtune.server.secure_agg import secure_train_round

    # Prepare: a rank-4 FFA run whose second site trains rank 2; a non-zero global B (B = 0 would hide the padding)
    run = _run(lm_files, lora={"site_ranks": [4, 2]}, federation={"aggregation": "ffa"},
               secure_agg={"enabled": True, "max_weight": 1000})  # a small max weight quantizes finely
    rng = np.random.default_rng(5)
    glob = {k: rng.normal(0, 0.05, tuple(v.shape)).astype(np.float32) for k, v in adapter_state(build_run_model(run).model).items()}
    assert glob and all(".lora_B." in k for k in glob), "under FFA only B crosses (the LM's A is frozen at the seed's value)"
    initial = ArrayRecord(OrderedDict((k, Array.from_numpy_ndarray(v)) for k, v in glob.items()))
    plain = _plain_replies(run, initial, tmp_path / "plain")
    assert {v.shape[1] for v in plain["site-1"][1].values()} == {2}, "the rank-2 site replies at its rank on the plain path"
    total = sum(w for w, _ in plain.values())
    padded = {site: _pad(arrays, glob) for site, (_, arrays) in plain.items()}
    exact = {k: sum(plain[s][0] * padded[s][k] for s in plain) / total for k in glob}

    # Execute: the same round through Flower's SecAgg+ (each site pads its own reply before masking)
    outcome = secure_train_round(InProcessGrid(_contexts(run)), _messages(NODES, initial, _config(tmp_path / "secure")), server_round=1,
                                 expected=initial, settings=run.secure_agg, timeout=120)

    # Assert
    assert not outcome.errors and outcome.error_bound < 1e-6
    for name in glob:
        assert np.abs(outcome.aggregate[name].numpy() - exact[name]).max() <= outcome.error_bound + 1e-6, name
    # The test can fail: zero padding of the rank-2 site's slots 2..3 would move the mean there by w_1 / total * B_global.
    zero_padded = {k: (plain["site-0"][0] * padded["site-0"][k] + plain["site-1"][0] * np.pad(plain["site-1"][1][k], ((0, 0), (0, 2))))
                   / total for k in glob}
    assert max(float(np.abs(exact[k] - zero_padded[k]).max()) for k in glob) > 100 * outcome.error_bound
    assert max(float(np.abs(plain["site-1"][1][k] - glob[k][:, :2]).max()) for k in glob) > 100 * outcome.error_bound, "site-1 trained"


def test_client_level_dp_of_a_causal_lm_run_records_its_calibration_and_releases_the_clipped_mean_plus_noise(lm_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dp_accounting = pytest.importorskip("dp_accounting")
    from safetensors.numpy import load_file

    from fedtune.common.model import adapter_state, build_run_model
    from fedtune.server.app import run_server

    class Grid(InProcessGrid):
        def get_node_ids(self) -> list[int]:
            return list(self.sites)

    # Prepare: DP-FedAvg over both sites (q = 1, m = 2) with a clip norm every LM update exceeds; z calibrated to epsilon 4
    clip = 1e-3
    run = _run(lm_files, tmp_path / "run", client_dp={"enabled": True, "target_epsilon": 4.0, "clip_norm": clip})
    glob = {k: v.numpy().astype(np.float64) for k, v in adapter_state(build_run_model(run).model).items()}
    assert any(".lora_A." in k for k in glob) and any(".lora_B." in k for k in glob), "plain LoRA: A and B cross"

    # Execute: the ServerApp's whole run (warm-up, round, checkpoint, summary, report, card) over the real ClientApps
    run_dir = run_server(Grid(_contexts(run)), run, run_id=7)

    # Assert: the calibration is recorded and is Google's accountant's epsilon for one Gaussian release at q = 1
    summary = json.loads((run_dir / "summary.json").read_text())
    plan = summary["client_level"]
    assert summary["task"] == "causal-lm" and plan["sites"] == 2 and plan["sample_rate"] == 1.0 and plan["clip_norm"] == clip
    z = plan["noise_multiplier"]
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(z), 1)
    independent = acc.get_epsilon(1e-5)
    assert plan["epsilon"] == pytest.approx(independent, rel=0.01) and independent <= 4.0 * 1.01
    assert json.loads((run_dir / "privacy.json").read_text())["client_level"] == plan
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    sigma = z * clip / 2
    assert line["client_dp"]["client-dp-sites"] == 2 and line["client_dp"]["client-dp-noise-std"] == pytest.approx(sigma)
    assert line["client_dp"]["client-dp-clipped-fraction"] == 1.0 and line["test_perplexity"] is not None

    # The released adapter is global + sum_i clip(delta_i, C) / m + N(0, sigma^2): the same sites served again give the deltas.
    plain = _plain_replies(run, ArrayRecord(adapter_state(build_run_model(run).model)), tmp_path / "oracle")
    names = list(glob)
    deltas = [np.concatenate([(arrays[k] - glob[k]).ravel() for k in names]) for _, arrays in plain.values()]
    assert all(np.linalg.norm(d) > 10 * clip for d in deltas), "every site's update is clipped"
    mean = sum(d * min(1.0, clip / np.linalg.norm(d)) for d in deltas) / 2
    released = load_file(str(run_dir / "checkpoints" / "round-1" / "adapter_model.safetensors"))
    residual = np.concatenate([released[k].astype(np.float64).ravel() - glob[k].ravel() for k in names]) - mean
    # n = 896 coordinates: the sample std's relative sd is 1 / sqrt(2 n) = 2.4%, so 15% is over 6 sd (flake rate < 1e-9);
    # the mean's sd is sigma / sqrt(n). float32 storage adds ~1e-9, far below sigma.
    n = residual.size
    assert n == 896
    assert abs(residual.std() / sigma - 1) < 0.15 and abs(residual.mean()) < 6 * sigma / np.sqrt(n)
    # The check can fail: without clipping, the LM's updates would leave a residual far wider than the noise.
    unclipped = residual + mean - sum(deltas) / 2
    assert unclipped.std() > 2 * sigma


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_lower_rank_lm_site_under_ffa_keeps_the_runs_first_a_rows_and_computes_the_global_model_where_b_is_zero(tmp_path, kind) -> None:  # type: ignore[no-untyped-def]
    """Heterogeneous ranks on a causal LM's own LoRA layers (Llama's Linear q/v_proj, GPT-2's Conv1D c_attn)."""
    import torch

    from fedtune.common.causal_lm import build_causal_lm
    from fedtune.common.lora_rank import truncate_lora
    from fedtune.common.model import adapter_state, load_adapter_state
    from tests.unit.test_causal_lm import _save_tiny

    # Prepare: the run's rank-4 model and a rank-2 site's, both FFA from the same seed
    path = _save_tiny(tmp_path / kind, kind)
    lora = from_dict({"lora": {"rank": 4, "top_layers": 0}}).lora
    glob = build_causal_lm(path, lora, seed=3, ffa=True).model.eval()
    site = build_causal_lm(path, lora, seed=3, ffa=True, site_rank=2).model.eval()
    gen = torch.Generator().manual_seed(0)
    state = OrderedDict((k, torch.randn(v.shape, generator=gen) * 0.5) for k, v in adapter_state(glob).items())
    for value in state.values():
        value[:, 2:] = 0.0  # B's slots 2..3: what the rank-2 site does not have
    ids = torch.tensor([[4, 5, 6, 7, 8, 9, 10]])

    # Execute
    load_adapter_state(glob, state)
    load_adapter_state(site, truncate_lora(state, 2))

    # Assert: A is the run's first 2 rows bit for bit; the same function (PEFT's scale alpha / r kept by the site's alpha)
    a_glob = {n: p for n, p in glob.named_parameters() if ".lora_A." in n}
    a_site = {n: p for n, p in site.named_parameters() if ".lora_A." in n}
    assert a_glob and a_glob.keys() == a_site.keys() and set(state) == {n.replace(".lora_A.", ".lora_B.").replace(".default", "") for n in a_glob}
    assert all(a_site[n].shape[0] == 2 and torch.equal(a_site[n], a_glob[n][:2]) for n in a_glob)
    with torch.no_grad():
        assert torch.allclose(site(input_ids=ids).logits, glob(input_ids=ids).logits, atol=1e-5)
        moved = OrderedDict((k, v.clone()) for k, v in state.items())
        for value in moved.values():
            value[:, 2:] = 0.5  # the test can fail: B in slots 2..3 changes what the global model computes
        load_adapter_state(glob, moved)
        assert not torch.allclose(site(input_ids=ids).logits, glob(input_ids=ids).logits, atol=1e-3)
