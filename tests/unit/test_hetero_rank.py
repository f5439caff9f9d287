"""Heterogeneous LoRA ranks (HetLoRA-style truncation, global-value padding): a site trains the
first r_i <= r rank slots, and its update is zero in the slots it did not train.

Real PEFT modules of the tiny BERT and real Flower messages through the coordinator's screening
and strategy, always with a non-zero global adapter (B = 0 would hide what padding does).
Oracles: the global's and the sites' own PEFT delta weights (FFA-LoRA, exact: the global product
plus the weighted mean of each site's change of its product), and a slot-by-slot weighted sum
written out in NumPy (plain LoRA's padded mean).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.client.policy import SitePolicy, policy_for, policy_from_mapping, policy_from_node_config
from fedtune.common.config import LoraSettings, RunConfig, from_dict, from_flat
from fedtune.common.errors import ConfigError, UpdateError
from fedtune.common.lora_rank import adapter_rank, pad_array, pad_lora, site_lora_alpha, truncate_lora
from fedtune.common.messages import PrivacyParams, TrainReply
from fedtune.common.model import ADAPTER_NAME, adapter_state, build_model, load_adapter_state, load_tokenizer, uses_ffa

LABELS = ["a", "b", "c"]


def _run(tiny_model_dir: Path, aggregation: str = "fedavg", **lora: object) -> RunConfig:
    return from_dict({"model": {"base_model": str(tiny_model_dir), "max_length": 24}, "lora": {"rank": 4, **lora},
                      "federation": {"aggregation": aggregation, "sites": 3}, "seed": 3})


def _model(run: RunConfig, site_rank: int | None = None) -> torch.nn.Module:
    model = build_model(run.model, run.lora, len(LABELS), seed=run.seed, ffa=uses_ffa(run), site_rank=site_rank).model
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.eval()


def _random_state(model: torch.nn.Module, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """The model's exchanged tensors with random non-zero values (B = 0 would hide a wrong product)."""
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(v.shape, generator=gen) * 0.1) for k, v in adapter_state(model).items())


def _delta_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """What each LoRA module adds to its base weight, as PEFT computes it: scale * B A."""
    from peft.tuners.lora import LoraLayer

    return {name: m.get_delta_weight(ADAPTER_NAME).detach().numpy().astype(np.float64)
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _reply(arrays: dict[str, np.ndarray], *, site: str, n: int) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1, message_type=MessageType.TRAIN)
    privacy = PrivacyParams(dp=True, epsilon=1.0, budget_epsilon=8.0, delta=1e-5, noise_multiplier=1.0, clip_norm=1.0,
                            sample_rate=0.1, steps=5)
    metrics = MetricRecord(TrainReply(site=site, weight=n, privacy=privacy).to_metrics())
    record = ArrayRecord(OrderedDict((k, Array.from_numpy_ndarray(np.asarray(v))) for k, v in arrays.items()))
    return Message(RecordDict({"arrays": record, "metrics": metrics, "site": ConfigRecord({"name": site})}), reply_to=request)


# ---------------------------------------------------------------------------------------------
# The helpers
# ---------------------------------------------------------------------------------------------


def test_truncate_keeps_the_first_slots_and_pad_fills_the_others_from_the_global_adapter() -> None:
    a = torch.arange(12.0).reshape(3, 4)  # [r = 3, in = 4]
    b = torch.arange(15.0).reshape(5, 3) + 100  # [out = 5, r = 3]
    state = OrderedDict([("m.lora_A.weight", a), ("m.lora_B.weight", b), ("classifier.weight", torch.ones(2, 4))])
    trained = OrderedDict((k, -v) for k, v in truncate_lora(state, 2).items())  # a site's rank-2 reply, every value changed

    cut = truncate_lora(state, 2)
    back = pad_lora(cut, state)
    padded = pad_lora(trained, state)

    assert cut["m.lora_A.weight"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert cut["m.lora_B.weight"].tolist() == [[100, 101], [103, 104], [106, 107], [109, 110], [112, 113]]
    assert cut["classifier.weight"] is state["classifier.weight"]
    assert all(torch.equal(back[k], state[k]) for k in state), "the global's own truncation pads back to the global"
    assert padded["m.lora_A.weight"].tolist() == [[0, -1, -2, -3], [-4, -5, -6, -7], [8, 9, 10, 11]]
    assert padded["m.lora_B.weight"][:, 2].tolist() == [102, 105, 108, 111, 114]
    assert torch.equal(padded["m.lora_B.weight"][:, :2], trained["m.lora_B.weight"])
    assert torch.equal(padded["classifier.weight"], trained["classifier.weight"])
    assert adapter_rank({k: tuple(v.shape) for k, v in padded.items()}) == 3
    # The NumPy twin the coordinator uses: the same values, the reply's dtype, the reference untouched.
    reference = b.numpy().astype(np.float64)
    np_padded = pad_array("m.lora_B.weight", trained["m.lora_B.weight"].numpy(), reference)
    assert np_padded.dtype == np.float32 and np.array_equal(np_padded, padded["m.lora_B.weight"].numpy())
    assert np.array_equal(reference, b.numpy()), "the reference is copied, not written to"
    with pytest.raises(UpdateError, match=r"tensor m.lora_A.weight has rank 3 \(shape \[3, 4\]\); cannot keep 4"):
        truncate_lora(state, 4)
    with pytest.raises(UpdateError, match=r"m.lora_A.weight has shape \[3, 4\]; padding it to the global adapter's \[2, 4\] "
                                          r"needs the global shape at a rank 1 <= r_i <= 2"):
        pad_lora(state, cut)
    with pytest.raises(UpdateError, match=r"m.lora_B.weight has shape \[4, 2\]; padding it to the global adapter's \[5, 3\]"):
        pad_array("m.lora_B.weight", np.zeros((4, 2)), b.numpy())
    with pytest.raises(UpdateError, match=r"classifier.weight has shape \[2, 3\], the global adapter's is \[2, 4\]"):
        pad_array("classifier.weight", np.zeros((2, 3)), np.ones((2, 4)))
    with pytest.raises(UpdateError, match="tensor m.lora_A.weight is not in the global adapter it is padded from"):
        pad_lora(cut, {"m.lora_B.weight": b})
    with pytest.raises(UpdateError, match="must share one rank"):
        adapter_rank({"x.lora_A.weight": (2, 4), "x.lora_B.weight": (4, 3)})


def test_site_alpha_keeps_peft_scale_alpha_over_r() -> None:
    assert site_lora_alpha(2.0, 8, 8) == 2.0
    assert site_lora_alpha(2.0, 8, 2) / 2 == 2.0 / 8
    with pytest.raises(ValueError, match=r"in \[1, 8\]"):
        site_lora_alpha(2.0, 8, 9)


# ---------------------------------------------------------------------------------------------
# The site's model: the same scale as the global one, and FFA's A truncated, not redrawn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
def test_a_lower_rank_site_computes_what_the_global_model_does_when_its_missing_slots_are_zero(
    tiny_model_dir: Path, aggregation: str
) -> None:
    # Prepare: a global rank-4 adapter whose slots 2 and 3 are zero, and a rank-2 site model.
    run = _run(tiny_model_dir, aggregation)
    glob = _model(run)
    random = _random_state(glob, seed=11)
    state = pad_lora(truncate_lora(random, 2), OrderedDict((k, torch.zeros_like(v)) for k, v in random.items()))
    load_adapter_state(glob, state)
    site = _model(run, site_rank=2)
    # The same truncation with the run's alpha: PEFT would scale it by alpha / 2, twice the global scale.
    naive = build_model(run.model, LoraSettings(rank=2, alpha=run.lora.alpha), len(LABELS), seed=run.seed, ffa=uses_ffa(run)).model.eval()
    tok = load_tokenizer(run.model)
    batch = tok(["chest pain for two days", "a headache and nausea since monday"], padding=True, return_tensors="pt")

    # Execute
    load_adapter_state(site, truncate_lora(state, 2))
    load_adapter_state(naive, truncate_lora(state, 2))
    if aggregation == "ffa":  # the naive model's own frozen A is the site's: the scale is the only difference
        assert all(torch.equal(p, dict(site.named_parameters())[n]) for n, p in naive.named_parameters() if ".lora_A." in n)
    with torch.no_grad():
        want, got, wrong = (m(**batch).logits for m in (glob, site, naive))

    # Assert
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()
    assert not torch.allclose(wrong, want, rtol=0, atol=1e-4), "the test cannot tell the scales apart"


def test_under_ffa_a_lower_rank_site_freezes_the_first_rows_of_the_runs_a_bit_for_bit(tiny_model_dir: Path) -> None:
    run = _run(tiny_model_dir, "ffa")
    full = {n: p for n, p in _model(run).named_parameters() if ".lora_A." in n}

    for rank in (1, 3):
        site = {n: p for n, p in _model(run, site_rank=rank).named_parameters() if ".lora_A." in n}
        assert site.keys() == full.keys()
        assert all(torch.equal(p, full[n][:rank]) and not p.requires_grad for n, p in site.items())
    with pytest.raises(ConfigError, match=r"in \[1, lora.rank = 4\], got 5"):
        _model(run, site_rank=5)


# ---------------------------------------------------------------------------------------------
# Aggregation through the coordinator's screening and strategy
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("flower_task_identity")
def test_ffa_global_value_padding_is_exact_the_global_product_plus_the_mean_change_of_the_sites_products(tiny_model_dir: Path) -> None:
    from fedtune.server.app import make_strategy
    from fedtune.server.screening import screen_train_replies

    # Prepare: a global adapter with a non-zero B (as after a round) and three sites at ranks 4, 2
    # and 1, each starting from its truncation of it and changing every B and head value it has.
    run = _run(tiny_model_dir, "ffa")
    glob = _model(run)
    global_state = _random_state(glob, seed=99)
    load_adapter_state(glob, global_state)
    global_delta = _delta_weights(glob)  # scale * B_g A
    initial = ArrayRecord(adapter_state(glob))
    ranks, weights = [4, 2, 1], [12, 30, 58]
    replies, changes, heads = [], [], []
    for i, (rank, n) in enumerate(zip(ranks, weights, strict=True)):
        site = _model(run, site_rank=rank)
        start = truncate_lora(global_state, rank)
        load_adapter_state(site, start)
        before = _delta_weights(site)  # scale * B_g[:, :r_i] A[:r_i, :], by the site's own PEFT model
        change = _random_state(site, seed=100 + i)
        load_adapter_state(site, OrderedDict((k, v + change[k]) for k, v in start.items()))
        after = _delta_weights(site)  # scale * B_i A[:r_i, :]
        changes.append({name: after[name] - before[name] for name in after})
        sent = {k: v.numpy() for k, v in adapter_state(site).items()}
        heads.append({k: v for k, v in sent.items() if ".lora_" not in k})
        assert adapter_rank({k: v.shape for k, v in sent.items()}) == rank
        replies.append(_reply(sent, site=f"site-{i}", n=n))

    # Execute
    accepted, rejected = screen_train_replies(replies, initial)
    arrays, _ = make_strategy(run).aggregate_train(1, [m for m, _ in accepted])

    # Assert: pad(B_i) A averaged == B_g A + mean_w((B_i - B_g[:, :r_i]) A[:r_i, :]), up to float32 rounding.
    assert not rejected and arrays is not None and len(accepted) == 3
    load_adapter_state(glob, arrays.to_torch_state_dict())
    got = _delta_weights(glob)
    assert got.keys() == global_delta.keys() == changes[0].keys()
    for name, value in got.items():
        oracle = global_delta[name] + np.average(np.stack([c[name] for c in changes]), axis=0, weights=weights)
        assert np.abs(value - oracle).max() <= 1e-5 * np.abs(oracle).max(), name
        assert np.abs(value - global_delta[name]).max() > 1e-3 * np.abs(oracle).max(), "the sites' changes must show"
    for name in heads[0]:
        np.testing.assert_allclose(arrays[name].numpy(), np.average([h[name] for h in heads], axis=0, weights=weights),
                                   rtol=1e-5, atol=1e-6)


SHAPES = {"m.lora_A.weight": (4, 6), "m.lora_B.weight": (5, 4), "classifier.weight": (3, 6)}


def _site_arrays(seed: int, rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"m.lora_A.weight": (rank, 6), "m.lora_B.weight": (5, rank), "classifier.weight": (3, 6)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _global() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(OrderedDict((k, Array.from_numpy_ndarray(rng.normal(size=s).astype(np.float32))) for k, s in SHAPES.items()))


@pytest.mark.usefixtures("flower_task_identity")
def test_plain_lora_padded_fedavg_matches_a_slot_by_slot_numpy_oracle() -> None:
    from fedtune.server.app import make_strategy
    from fedtune.server.screening import screen_train_replies

    glob = _global()
    g = {k: v.numpy().astype(np.float64) for k, v in glob.items()}
    ranks, weights = [4, 2, 1, 3], [10, 40, 25, 5]
    sent = [_site_arrays(10 + i, r) for i, r in enumerate(ranks)]
    replies = [_reply(a, site=f"s{i}", n=n) for i, (a, n) in enumerate(zip(sent, weights, strict=True))]

    accepted, rejected = screen_train_replies(replies, glob)
    arrays, _ = make_strategy(from_dict({"federation": {"sites": 4}})).aggregate_train(1, [m for m, _ in accepted])

    assert not rejected and arrays is not None
    total = sum(weights)
    # Slot j: the sites that have it count with their own values, the others with the global's.
    a_oracle = np.zeros((4, 6))
    b_oracle = np.zeros((5, 4))
    for j in range(4):
        for x, w, r in zip(sent, weights, ranks, strict=True):
            a_oracle[j] += w * (x["m.lora_A.weight"][j] if j < r else g["m.lora_A.weight"][j]) / total
            b_oracle[:, j] += w * (x["m.lora_B.weight"][:, j] if j < r else g["m.lora_B.weight"][:, j]) / total
    np.testing.assert_allclose(arrays["m.lora_A.weight"].numpy(), a_oracle, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays["m.lora_B.weight"].numpy(), b_oracle, rtol=1e-5, atol=1e-6)
    head = np.average([x["classifier.weight"] for x in sent], axis=0, weights=weights)
    np.testing.assert_allclose(arrays["classifier.weight"].numpy(), head, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("flower_task_identity")
def test_a_slot_only_lower_rank_sites_replied_for_keeps_the_global_value_and_their_update_is_zero_there() -> None:
    from fedtune.server.aggregation import update_delta
    from fedtune.server.app import make_strategy
    from fedtune.server.screening import screen_train_replies

    # Prepare: a global adapter non-zero in every slot, and the round's only reply from a rank-1 site.
    # Zero padding would set slots 1..3 to 0 here (and scale them by the weight of the sites that
    # lack them in a round with others), and the site's update there would be minus the global values.
    glob = _global()
    g = {k: v.numpy() for k, v in glob.items()}
    assert all(np.abs(v).min() > 0 for v in g.values())
    sent = _site_arrays(30, 1)

    # Execute
    accepted, rejected = screen_train_replies([_reply(sent, site="small", n=7)], glob)
    arrays, _ = make_strategy(from_dict({"federation": {"sites": 2}})).aggregate_train(1, [m for m, _ in accepted])

    # Assert
    assert not rejected and arrays is not None
    update = update_delta({k: v.numpy() for k, v in accepted[0][0].content["arrays"].items()}, g)
    assert not update["m.lora_A.weight"][1:].any() and not update["m.lora_B.weight"][:, 1:].any()
    a, b = arrays["m.lora_A.weight"].numpy(), arrays["m.lora_B.weight"].numpy()
    np.testing.assert_array_equal(a[1:], g["m.lora_A.weight"][1:])
    np.testing.assert_array_equal(b[:, 1:], g["m.lora_B.weight"][:, 1:])
    np.testing.assert_array_equal(a[:1], sent["m.lora_A.weight"])
    np.testing.assert_array_equal(b[:, :1], sent["m.lora_B.weight"])


@pytest.mark.usefixtures("flower_task_identity")
def test_a_robust_rule_sees_the_padded_updates() -> None:
    from fedtune.server.app import make_strategy
    from fedtune.server.screening import screen_train_replies

    from .test_aggregation import FakeSitesGrid

    glob = _global()
    g = {k: v.numpy().astype(np.float64) for k, v in glob.items()}
    ranks = [4, 2, 1]
    sent = [_site_arrays(20 + i, r) for i, r in enumerate(ranks)]
    accepted, rejected = screen_train_replies([_reply(a, site=f"s{i}", n=10) for i, a in enumerate(sent)], glob)

    strategy = make_strategy(from_dict({"federation": {"aggregation": "median", "sites": 3}}))
    list(strategy.configure_train(1, glob, ConfigRecord(), FakeSitesGrid(lambda node, _: None, [1, 2, 3])))  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, [m for m, _ in accepted])

    assert not rejected and arrays is not None
    changes = []
    for x, r in zip(sent, ranks, strict=True):
        # Written out, not through the implementation: a site's change is zero in the slots it lacks.
        da, db = np.zeros((4, 6)), np.zeros((5, 4))
        da[:r] = x["m.lora_A.weight"] - g["m.lora_A.weight"][:r]
        db[:, :r] = x["m.lora_B.weight"] - g["m.lora_B.weight"][:, :r]
        changes.append({"m.lora_A.weight": da, "m.lora_B.weight": db, "classifier.weight": x["classifier.weight"] - g["classifier.weight"]})
    for name in SHAPES:
        oracle = g[name] + np.median([c[name] for c in changes], axis=0)
        np.testing.assert_allclose(arrays[name].numpy(), oracle, rtol=1e-5, atol=1e-6)
    # Slot 3 only the rank-4 site has: the median of (its change, 0, 0) keeps the global value.
    np.testing.assert_allclose(arrays["m.lora_A.weight"].numpy()[3], g["m.lora_A.weight"][3], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Screening: which shapes pass, and what is said about the others
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("flower_task_identity")
def test_screening_accepts_a_lower_rank_reply_and_pads_it_in_the_message() -> None:
    from fedtune.server.screening import check_train_reply, screen_train_replies

    sent = _site_arrays(1, 2)
    msg = _reply(sent, site="small", n=10)
    check_train_reply(msg, _global())
    assert tuple(msg.content["arrays"]["m.lora_A.weight"].shape) == (2, 6), "check_train_reply leaves the message as sent"

    glob = _global()
    g = {k: v.numpy() for k, v in glob.items()}
    accepted, rejected = screen_train_replies([msg], glob)

    assert not rejected and accepted[0][1].site == "small"
    got = accepted[0][0].content["arrays"]
    a, b = got["m.lora_A.weight"].numpy(), got["m.lora_B.weight"].numpy()
    assert a.shape == (4, 6) and b.shape == (5, 4) and a.dtype == np.float32
    assert np.array_equal(a[:2], sent["m.lora_A.weight"]) and np.array_equal(a[2:], g["m.lora_A.weight"][2:])
    assert np.array_equal(b[:, :2], sent["m.lora_B.weight"]) and np.array_equal(b[:, 2:], g["m.lora_B.weight"][:, 2:])
    assert np.array_equal(glob["m.lora_A.weight"].numpy(), g["m.lora_A.weight"]), "the global adapter is not written to"
    assert np.array_equal(got["classifier.weight"].numpy(), sent["classifier.weight"])


def _with(arrays: dict[str, np.ndarray], **changes: np.ndarray) -> dict[str, np.ndarray]:
    return {**arrays, **{k.replace("__", "."): v for k, v in changes.items()}}


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        # A at rank 2, B at rank 3: a tie, so the larger rank is taken as the reply's and A is blamed.
        (_with(_site_arrays(2, 2), m__lora_B__weight=np.zeros((5, 3), np.float32)),
         ["tensor m.lora_A.weight is float32[2, 6], expected float32[3, 6]", "float32[r, 6] for one rank 1 <= r <= 4"]),
        (_with(_site_arrays(3, 4), m__lora_A__weight=np.zeros((0, 6), np.float32), m__lora_B__weight=np.zeros((5, 0), np.float32)),
         ["tensor m.lora_A.weight is float32[0, 6], expected float32[4, 6]"]),
        (_with(_site_arrays(4, 4), m__lora_A__weight=np.zeros((5, 6), np.float32), m__lora_B__weight=np.zeros((5, 5), np.float32)),
         ["tensor m.lora_A.weight is float32[5, 6], expected float32[4, 6]"]),
        (_with(_site_arrays(5, 2), m__lora_A__weight=np.zeros((2, 7), np.float32)),
         ["tensor m.lora_A.weight is float32[2, 7], expected float32[2, 6]", "most of this reply's are at r = 2"]),
        (_with(_site_arrays(6, 2), classifier__weight=np.zeros((2, 6), np.float32)),
         ["tensor classifier.weight is float32[2, 6], expected float32[3, 6]"]),
        (_with(_site_arrays(7, 2), m__lora_B__weight=np.zeros((5, 2), np.float64)),
         ["tensor m.lora_B.weight is float64[5, 2], expected float32[5, 2]"]),
        (_with(_site_arrays(8, 2), m__lora_B__weight=np.full((5, 2), np.nan, np.float32)),
         ["tensor m.lora_B.weight has NaN or Inf values"]),
    ],
    ids=["mixed-ranks", "rank-0", "rank-above-r", "other-dim", "head", "dtype", "nan"],
)
def test_screening_rejects_any_other_shape_naming_the_tensor_the_shape_found_and_the_shapes_allowed(
    arrays: dict[str, np.ndarray], words: list[str]
) -> None:
    from fedtune.server.screening import screen_train_replies

    accepted, rejected = screen_train_replies([_reply(arrays, site="odd", n=10)], _global())

    assert not accepted and rejected[0].site == "odd"
    assert all(w in rejected[0].reason for w in words), rejected[0].reason


@pytest.mark.usefixtures("flower_task_identity")
def test_the_norm_bound_sees_only_what_a_lower_rank_site_changed() -> None:
    from fedtune.server.screening import screen_train_replies

    # A rank-1 site that moved slot 0 of A and B by small steps: its padded update is those steps
    # alone. Zero padding would add minus the global's slots 1..3 (norms 4.09 for A and 3.25 for B here).
    glob = _global()
    g = {k: v.numpy() for k, v in glob.items()}
    rng = np.random.default_rng(5)
    step_a = (0.01 * rng.normal(size=(1, 6))).astype(np.float32)
    step_b = (0.02 * rng.normal(size=(5, 1))).astype(np.float32)
    sent = {"m.lora_A.weight": g["m.lora_A.weight"][:1] + step_a, "m.lora_B.weight": g["m.lora_B.weight"][:, :1] + step_b,
            "classifier.weight": g["classifier.weight"]}
    # The norm of what the site changed, from the float32 values it sent (the step after rounding).
    norm_a = float(np.linalg.norm(sent["m.lora_A.weight"].astype(np.float64) - g["m.lora_A.weight"][:1]))
    norm_b = float(np.linalg.norm(sent["m.lora_B.weight"].astype(np.float64) - g["m.lora_B.weight"][:, :1]))
    bound = max(norm_a, norm_b)
    assert bound < 0.1 < float(np.linalg.norm(g["m.lora_B.weight"][:, 1:]))

    passed, _ = screen_train_replies([_reply(sent, site="at", n=10)], glob, max_update_norm=bound * (1 + 1e-9))
    _, over = screen_train_replies([_reply(sent, site="under", n=10)], glob, max_update_norm=bound * (1 - 1e-6))

    assert [r.site for _, r in passed] == ["at"]
    group = "lora_A" if norm_a >= norm_b else "lora_B"
    assert f"{group} update norm {bound:.6g} exceeds the bound" in over[0].reason


# ---------------------------------------------------------------------------------------------
# Where a site's rank comes from: its policy (deployed), lora.site_ranks (simulation), the CLI
# ---------------------------------------------------------------------------------------------


def test_policy_max_lora_rank_caps_the_rank_and_zero_means_the_runs() -> None:
    assert SitePolicy().max_lora_rank == 0
    assert [SitePolicy(max_lora_rank=m).lora_rank(8) for m in (0, 4, 8, 16)] == [8, 4, 8, 8]
    assert policy_from_node_config(SitePolicy(max_lora_rank=3).to_node_config()).max_lora_rank == 3
    assert policy_for({"partition-id": 1, "num-partitions": 3}, simulation_max_lora_rank=2).lora_rank(8) == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "policy.max_lora_rank must be >= 0 (0: the run's rank, no limit), got -1."),
     ("four", "policy.max_lora_rank must be an integer, got 'four'.")],
)
def test_policy_max_lora_rank_problems_name_the_key_value_and_what_is_allowed(value: object, message: str) -> None:
    _, problems = policy_from_mapping({"max_lora_rank": value})
    assert message in problems


def test_site_toml_carries_max_lora_rank_to_the_site_and_site_init_writes_it(tmp_path: Path) -> None:
    import tomllib

    from fedtune.client.daemon import load_site_config, write_site_config

    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "d.csv").write_text("text,label\n")
    path = write_site_config(tmp_path / "site", name="a", coordinator="coord:9093", ca=tmp_path / "ca.crt", data=tmp_path / "d.csv",
                             text_column="text", label_column="label", budget_epsilon=4.0, delta=1e-6)
    assert tomllib.loads(path.read_text())["policy"]["max_lora_rank"] == 0
    path.write_text(path.read_text().replace("max_lora_rank = 0", "max_lora_rank = 4"))
    site = load_site_config(path)
    assert site.policy.max_lora_rank == 4 and policy_from_node_config(site.node_config()).lora_rank(8) == 4


def test_simulated_sites_take_their_rank_from_lora_site_ranks(tmp_path: Path) -> None:
    from fedtune.client.site import resolve_site

    run = from_dict({"lora": {"rank": 8, "site_ranks": [8, 4, 2]}, "federation": {"sites": 3}})
    got = [resolve_site({"partition-id": k, "num-partitions": 3}, run, run_dir=str(tmp_path)).policy.lora_rank(run.lora.rank)
           for k in range(3)]
    plain = from_dict({"lora": {"rank": 8}, "federation": {"sites": 3}})

    assert got == [8, 4, 2]
    assert resolve_site({"partition-id": 2, "num-partitions": 3}, plain, run_dir=str(tmp_path)).policy.lora_rank(8) == 8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"lora": {"rank": 8, "site_ranks": [8, 0, 9]}, "federation": {"sites": 3}},
         "lora.site_ranks must each be in [1, lora.rank = 8], got [8, 0, 9] ([0, 9] outside)."),
        ({"lora": {"rank": 8, "site_ranks": [4, 2]}, "federation": {"sites": 3}},
         "lora.site_ranks must give one rank per simulated site (federation.sites = 3), got 2: [4, 2]."),
        ({"lora": {"site_ranks": "4,x"}}, "lora.site_ranks must be a list of integers or a comma-separated string of them, got '4,x'."),
        ({"lora": {"site_ranks": [4, 2.5]}}, "lora.site_ranks must be a list of integers"),
        ({"lora": {"site_ranks": [4, 2]}, "federation": {"sites": 2}, "simulation": False},
         "lora.site_ranks = [4, 2] applies to simulations only; a deployed site caps its own LoRA rank with [policy] max_lora_rank"),
    ],
)
def test_site_ranks_problems_name_the_key_the_value_and_what_is_allowed(data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_site_ranks_survive_flowers_flat_run_config_and_the_run_directorys_toml(tmp_path: Path) -> None:
    from fedtune.common.config import dump_toml, load_toml

    run = from_dict({"lora": {"rank": 8, "site_ranks": "8, 4,4,2"}, "federation": {"sites": 4}})
    dump_toml(run, tmp_path / "config.toml")

    assert run.lora.site_ranks == (8, 4, 4, 2)
    assert run.to_flat()["lora.site_ranks"] == "8,4,4,2"
    assert from_flat(run.to_flat()) == run and load_toml(tmp_path / "config.toml") == run
    assert from_flat(RunConfig().to_flat()).lora.site_ranks == ()


def test_cli_site_ranks_flag_reaches_the_config_and_a_bad_one_is_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main
    from fedtune.cli.options import resolve_config as _resolve_config

    run = _resolve_config(None, "sim", site_ranks="4,2", sites=2, lora_rank=4, out=str(tmp_path / "ok"))
    result = CliRunner().invoke(main, ["simulate", "--sites", "2", "--lora-rank", "4", "--site-ranks", "4,8",
                                       "--out", str(tmp_path / "bad")])

    assert run.lora.site_ranks == (4, 2) and run.lora.rank == 4
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "lora.site_ranks must each be in [1, lora.rank = 4], got [4, 8]" in result.output


# ---------------------------------------------------------------------------------------------
# The site's handler: it trains rank r_i and replies at r_i, or padded to r in a SecAgg+ round
# ---------------------------------------------------------------------------------------------


def test_a_simulated_site_replies_at_its_rank_and_pads_its_own_reply_in_a_secure_round(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.client import handlers
    from fedtune.client.site_request import SiteRequest
    from fedtune.common.messages import MAX_WEIGHT_KEY, RoundInstructions
    from fedtune.common.sitedata import load_config_table, run_labels

    run = from_dict({"model": {"base_model": str(tiny_model_dir), "max_length": 24}, "lora": {"rank": 4, "site_ranks": [4, 2]},
                     "federation": {"sites": 2, "rounds": 1}, "privacy": {"noise_multiplier": 1.0},
                     "train": {"local_epochs": 0.25, "batch_size": 16, "learning_rate": 1e-2}})
    labels = run_labels(run.data, load_config_table(run.data))
    glob = build_model(run.model, run.lora, len(labels), seed=run.seed).model
    received = OrderedDict((k, v.numpy()) for k, v in _random_state(glob, seed=4).items())

    def serve(run_dir: Path, **extra: float) -> OrderedDict[str, np.ndarray]:
        config = {**RoundInstructions(server_round=1, num_rounds=1, labels=tuple(labels), run_dir=str(run_dir)).to_config(), **extra}
        reply = handlers.handle(SiteRequest(kind="train", run_config=run.to_flat(), node_config={"partition-id": 1, "num-partitions": 2},
                                            run_id=1, config=config, arrays=received))
        assert reply.arrays is not None
        return reply.arrays

    plain = serve(tmp_path / "plain")
    secure = serve(tmp_path / "secure", **{MAX_WEIGHT_KEY: 1e6})

    assert adapter_rank({k: v.shape for k, v in plain.items()}) == 2
    assert adapter_rank({k: v.shape for k, v in secure.items()}) == 4
    # The site pads with the adapter it received: its update is zero in slots 2..3, and it trained slots 0..1.
    for name, value in secure.items():
        assert value.shape == received[name].shape
        if ".lora_A." in name:
            assert np.array_equal(value[2:], received[name][2:]) and not np.array_equal(value[:2], received[name][:2]), name
        elif ".lora_B." in name:
            assert np.array_equal(value[:, 2:], received[name][:, 2:]) and not np.array_equal(value[:, :2], received[name][:, :2]), name
    assert any(np.abs(received[k][:, 2:]).min() > 0 for k in received if ".lora_B." in k), "zero padding must fail this test"
