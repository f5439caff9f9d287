"""SecAgg+ against an active coordinator: the site's bridge refuses what Flower's mod would answer.

A coordinator here is a test that builds the stage messages itself, exactly as Flower's
``SecAggPlusWorkflow`` does (same records, keys and forwarding), but free to lie: a threshold of 1,
a minority threshold, a node listed both active and dropped. The sites are the real ClientApp
(fedtune's bridge around Flower's real ``secaggplus_mod``, its cryptography and fedtune's mask
generator); only training is a fixed update, as the protocol does not look at how it was made.

The first test runs the attack against Flower's bare mod and recovers a site's adapter: that is
what the refusals below prevent, and it shows the attack messages are well formed.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState, secaggplus_mod
from flwr.common import FitIns, Parameters, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedtune.client import secure_agg
from fedtune.client.app import build_client_app
from fedtune.client.site_request import SiteReply
from fedtune.common.masks import expand, install
from fedtune.common.messages import ARRAY_NAMES_KEY, REFUSAL_ERROR_CODE, Refusal, RefusalCode

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SHAPES = {"a.lora_A.weight": (2, 5), "classifier.weight": (3, 2)}
CLIP = 8.0
QUANT = 2**28  # 3 to 5 sites cannot wrap 2**32
MOD = 2**32
MAX_WEIGHT = 1000.0
WEIGHT = 250
METRICS = {"num-examples": WEIGHT, "dp": 1, "steps": 4, "epsilon": 1.0, "budget-epsilon": 8.0, "delta": 1e-5,
           "noise-multiplier": 1.1, "clip-norm": 1.0, "sample-rate": 0.5}

Handler = Callable[[Message, Context], Message]


def _update(node: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return OrderedDict((k, rng.uniform(-2, 2, s).astype(np.float32)) for k, s in SHAPES.items())


@pytest.fixture(autouse=True)
def fixed_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training replaced by a fixed update per site: these tests are about the protocol messages."""

    def fake_site_reply(context: Context, kind: str, overrides: Any, arrays: Any, config: Any) -> SiteReply:
        return SiteReply(site=f"site-{context.node_id}", metrics=dict(METRICS), arrays=_update(int(context.node_id)))

    monkeypatch.setattr(secure_agg, "site_reply", fake_site_reply)


def fedtune_site() -> Handler:
    """The real ClientApp: its train entry routes SecAgg+ messages through the site's bridge."""
    return build_client_app()


def bare_flower_mod() -> Handler:
    """Flower's mod with the same masking-stage handler and no checks of the coordinator's inputs."""
    install()

    def fit(msg: Message, ctxt: Context) -> Message:
        return Message(secure_agg._fit(msg.content, ctxt, {}), reply_to=msg)

    return lambda msg, ctxt: secaggplus_mod(msg, ctxt, fit)


def _contexts(nodes: list[int], node_config: dict[str, Any] | None = None) -> dict[int, Context]:
    return {n: Context(run_id=7, node_id=n, node_config=dict(node_config or {}), state=RecordDict(), run_config={}) for n in nodes}


class Coordinator:
    """Sends SecAgg+ stage messages built as Flower's workflow builds them, with whatever values it likes."""

    def __init__(self, handler: Handler, contexts: dict[int, Context]) -> None:
        self.handler = handler
        self.contexts = contexts
        self.public_keys: dict[int, list[bytes]] = {}
        self.forward: dict[int, tuple[list[int], list[bytes]]] = {}
        self.masked: dict[int, list[np.ndarray]] = {}

    def send(self, node: int, config: dict[str, Any], content: RecordDict | None = None) -> Message:
        content = content if content is not None else RecordDict()
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(config)  # type: ignore[arg-type]
        msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id="1")
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # the SuperLink assigns ids on push
        return self.handler(msg, self.contexts[node])

    def setup(self, nodes: list[int], *, threshold: int, sample_num: int | None = None, share_num: int | None = None) -> dict[int, Message]:
        config = {
            Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sample_num or len(nodes), Key.SHARE_NUMBER: share_num or len(nodes),
            Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: CLIP, Key.TARGET_RANGE: QUANT, Key.MOD_RANGE: MOD, Key.MAX_WEIGHT: MAX_WEIGHT,
        }
        replies = {n: self.send(n, dict(config)) for n in nodes}
        for n, reply in replies.items():
            if not reply.has_error():
                keys = reply.content.config_records[RECORD_KEY_CONFIGS]
                self.public_keys[n] = [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]  # type: ignore[list-item]
        return replies

    def share_keys(self, nodes: list[int], neighbours: dict[int, list[int]] | None = None) -> dict[int, Message]:
        replies = {}
        for n in nodes:
            config: dict[str, Any] = {str(u): self.public_keys[u] for u in (neighbours or {}).get(n, nodes)}
            config[Key.STAGE] = Stage.SHARE_KEYS
            replies[n] = self.send(n, config)
        self.forward = {n: ([], []) for n in nodes}
        for src, reply in replies.items():
            if reply.has_error():
                continue
            res = reply.content.config_records[RECORD_KEY_CONFIGS]
            for dst, ciphertext in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True):  # type: ignore[arg-type]
                if dst in self.forward:
                    self.forward[dst][0].append(src)
                    self.forward[dst][1].append(ciphertext)
        return replies

    def collect_masked_vectors(self, nodes: list[int]) -> dict[int, Message]:
        names = list(SHAPES)
        replies = {}
        for n in nodes:
            params = Parameters(tensors=[ndarray_to_bytes(np.zeros(s, np.float32)) for s in SHAPES.values()], tensor_type="numpy.ndarray")
            content = compat.fitins_to_recorddict(FitIns(params, {ARRAY_NAMES_KEY: names, "server-round": 1}), True)
            srcs, ciphertexts = self.forward[n]
            replies[n] = self.send(n, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: srcs},
                                   content)
        for n, reply in replies.items():
            if not reply.has_error():
                masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                self.masked[n] = [bytes_to_ndarray(b) for b in masked]  # type: ignore[union-attr]
        return replies

    def unmask(self, node: int, *, active: list[int], dropped: list[int]) -> Message:
        return self.send(node, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: list(active), Key.DEAD_NODE_ID_LIST: list(dropped)})

    def run_to_unmask(self, nodes: list[int], threshold: int) -> None:
        for stage in (lambda: self.setup(nodes, threshold=threshold), lambda: self.share_keys(nodes),
                      lambda: self.collect_masked_vectors(nodes)):
            replies = stage()
            assert not any(r.has_error() for r in replies.values()), [_code(r) for r in replies.values()]


def _code(reply: Message) -> RefusalCode | None:
    """The refusal code of an error reply (None for a reply that is not a fedtune refusal)."""
    if not reply.has_error() or reply.error.code != REFUSAL_ERROR_CODE:
        return None
    parsed = Refusal.parse(reply.error.reason)
    return parsed.code if parsed else None


def _all_bytes(reply: Message) -> list[bytes]:
    if not reply.has_content():
        return []
    found: list[bytes] = []
    for record in reply.content.config_records.values():
        for value in record.values():
            found += [value] if isinstance(value, bytes) else [v for v in value if isinstance(v, bytes)] if isinstance(value, list) else []
    return found


def _held_state(context: Context) -> SecAggPlusState:
    return SecAggPlusState(**dict(context.state.config_records[RECORD_KEY_STATE]))


def _strip_masks(coordinator: Coordinator, victim: int, b_shares: list[bytes], sk1_shares: list[bytes], neighbours: list[int]) -> np.ndarray:
    """What a coordinator holding t shares of both of a site's secrets computes: the site's own update."""
    rd_seed, sk1 = combine_shares(b_shares), combine_shares(sk1_shares)
    masked = coordinator.masked[victim]
    shapes = [a.shape for a in masked]
    vector = [(m - p) % MOD for m, p in zip(masked, expand(rd_seed, MOD, shapes), strict=True)]
    for u in neighbours:
        pairwise = expand(generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(coordinator.public_keys[u][0])), MOD, shapes)
        # The site added the pairwise mask towards a smaller node id and subtracted it otherwise.
        vector = [(v - p) % MOD if victim > u else (v + p) % MOD for v, p in zip(vector, pairwise, strict=True)]
    q_ratio, quantized = int(vector[0][0]), vector[1:]
    values = dequantize(quantized, CLIP, QUANT)
    return np.concatenate([v.ravel() for v in values]) * QUANT / q_ratio


# -- the attack the bridge prevents -----------------------------------------------------------------
def test_a_node_listed_active_and_dropped_lets_the_coordinator_strip_its_masks_through_flowers_bare_mod() -> None:
    nodes, victim = [11, 22, 33], 22
    coordinator = Coordinator(bare_flower_mod(), _contexts(nodes))
    coordinator.run_to_unmask(nodes, threshold=2)

    b_shares, sk1_shares = [], []
    for n in (11, 33):  # the victim's neighbours, each told the victim is both active and dropped
        reply = coordinator.unmask(n, active=nodes, dropped=[victim])
        res = reply.content.config_records[RECORD_KEY_CONFIGS]
        pairs = list(zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True))  # type: ignore[arg-type]
        b_shares.append(next(s for nid, s in pairs[: len(nodes)] if nid == victim))
        sk1_shares.append(next(s for nid, s in pairs[len(nodes):] if nid == victim))
    recovered = _strip_masks(coordinator, victim, b_shares, sk1_shares, [11, 33])

    truth = np.concatenate([v.ravel() for v in _update(victim).values()])
    step = 2 * CLIP / QUANT * MAX_WEIGHT / WEIGHT  # one quantization step, scaled back by the site's weight
    assert np.abs(recovered - truth).max() <= 2 * step, "the coordinator recovered the site's own adapter"


def test_the_site_refuses_a_node_listed_active_and_dropped_and_sends_no_share() -> None:
    nodes, victim = [11, 22, 33], 22
    contexts = _contexts(nodes)
    coordinator = Coordinator(fedtune_site(), contexts)
    coordinator.run_to_unmask(nodes, threshold=2)
    held = {n: _held_state(contexts[n]) for n in nodes}
    secrets_of_victim = {s for n in nodes for s in (held[n].rd_seed_share_dict[victim], held[n].sk1_share_dict[victim])}

    replies = {n: coordinator.unmask(n, active=nodes, dropped=[victim]) for n in (11, 33)}

    for n, reply in replies.items():
        assert _code(reply) is RefusalCode.SECURE_AGG_DROPPED, n
        assert not reply.has_content() and not set(_all_bytes(reply)) & secrets_of_victim
        assert RECORD_KEY_STATE not in contexts[n].state.config_records, "a refusing site forgets the round's secrets"
    # Having refused, the site answers no later unmask of that round, even an honest one.
    retry = coordinator.unmask(11, active=nodes, dropped=[])
    assert _code(retry) is RefusalCode.SECURE_AGG_PROTOCOL and not retry.has_content()


def test_the_site_refuses_to_be_listed_dropped_itself() -> None:
    nodes = [11, 22, 33]
    contexts = _contexts(nodes)
    coordinator = Coordinator(fedtune_site(), contexts)
    coordinator.run_to_unmask(nodes, threshold=2)
    own = _held_state(contexts[22]).sk1_share_dict[22]

    reply = coordinator.unmask(22, active=[11, 33], dropped=[22])

    assert _code(reply) is RefusalCode.SECURE_AGG_DROPPED
    assert own not in _all_bytes(reply) and not reply.has_content()


@pytest.mark.parametrize(
    ("active", "dropped", "why"),
    [
        ([11, 22, 33, 99], [], "a node that was not in the round"),
        ([11, 22], [99], "a dropped node that was not in the round"),
        ([22], [11, 33], "fewer active nodes than the threshold"),
        ([11, 22, 22], [], "a node listed twice"),
    ],
)
def test_unmask_lists_outside_the_round_are_refused(active: list[int], dropped: list[int], why: str) -> None:
    nodes = [11, 22, 33]
    coordinator = Coordinator(fedtune_site(), _contexts(nodes))
    coordinator.run_to_unmask(nodes, threshold=2)

    reply = coordinator.unmask(22, active=active, dropped=dropped)

    assert _code(reply) is RefusalCode.SECURE_AGG_PROTOCOL, why
    assert not reply.has_content()


def test_an_honest_unmask_is_answered_with_one_share_per_node() -> None:
    nodes = [11, 22, 33]
    contexts = _contexts(nodes)
    coordinator = Coordinator(fedtune_site(), contexts)
    coordinator.run_to_unmask(nodes, threshold=2)

    reply = coordinator.unmask(22, active=[11, 22], dropped=[33])  # 33 dropped after sending its keys

    assert not reply.has_error()
    res = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert res[Key.NODE_ID_LIST] == [11, 22, 33] and len(res[Key.SHARE_LIST]) == 3  # type: ignore[arg-type]
    assert RECORD_KEY_STATE not in contexts[22].state.config_records, "the round's secrets are dropped once it is over"


def test_a_site_policy_that_does_not_parse_refuses_with_its_own_code() -> None:
    reply = Coordinator(fedtune_site(), _contexts([1], {"policy.min_secure_agg_threshold": "many"})).setup([1], threshold=2)[1]
    assert _code(reply) is RefusalCode.SITE_CONFIG


def test_an_unmask_before_any_setup_is_a_protocol_refusal() -> None:
    reply = Coordinator(fedtune_site(), _contexts([11])).unmask(11, active=[11, 22], dropped=[])
    assert _code(reply) is RefusalCode.SECURE_AGG_PROTOCOL


# -- the coordinator's setup values against the site's policy -----------------------------------------
@pytest.mark.parametrize(
    ("nodes", "threshold", "node_config", "code"),
    [
        ([1, 2, 3, 4, 5], 1, {}, RefusalCode.SECURE_AGG_THRESHOLD),  # below the policy's minimum of 2
        ([1, 2, 3, 4, 5], 2, {}, RefusalCode.SECURE_AGG_THRESHOLD),  # 2 of 5: a minority could unmask
        ([1, 2, 3, 4], 2, {}, RefusalCode.SECURE_AGG_THRESHOLD),  # exactly half is not a majority
        ([1, 2, 3], 2, {"policy.min_secure_agg_threshold": 3, "policy.min_secure_agg_participants": 3},
         RefusalCode.SECURE_AGG_THRESHOLD),  # the site's own minimum
        ([1, 2, 3], 2, {"policy.min_secure_agg_participants": 4}, RefusalCode.SECURE_AGG_PARTICIPANTS),
    ],
)
def test_setup_below_the_sites_policy_or_without_a_majority_is_refused_before_keys_exist(
    nodes: list[int], threshold: int, node_config: dict[str, Any], code: RefusalCode
) -> None:
    contexts = _contexts(nodes, node_config)
    replies = Coordinator(fedtune_site(), contexts).setup(nodes, threshold=threshold)

    for n, reply in replies.items():
        assert _code(reply) is code, n
        assert not reply.has_content()
        assert RECORD_KEY_STATE not in contexts[n].state.config_records, "no keys were generated"


def test_setup_with_a_majority_threshold_within_the_policy_is_answered_with_public_keys() -> None:
    nodes = [1, 2, 3, 4, 5]
    replies = Coordinator(fedtune_site(), _contexts(nodes, {"policy.min_secure_agg_threshold": 3, "policy.min_secure_agg_participants": 3})).setup(nodes, threshold=3)
    for reply in replies.values():
        assert not reply.has_error()
        assert set(reply.content.config_records[RECORD_KEY_CONFIGS]) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}


def test_share_holders_are_counted_from_the_smaller_of_sample_and_share_numbers() -> None:
    # 3 of 9 sampled sites, but each shares with only 4 neighbours: 3 of 4 is a majority; 2 of 4 is not.
    assert not Coordinator(fedtune_site(), _contexts([1])).setup([1], threshold=3, sample_num=9, share_num=4)[1].has_error()
    reply = Coordinator(fedtune_site(), _contexts([1])).setup([1], threshold=2, sample_num=9, share_num=4)[1]
    assert _code(reply) is RefusalCode.SECURE_AGG_THRESHOLD
    reply = Coordinator(fedtune_site(), _contexts([1])).setup([1], threshold=5, sample_num=9, share_num=4)[1]
    assert _code(reply) is RefusalCode.SECURE_AGG_PROTOCOL, "a threshold above the share-holders can never unmask"


def test_share_keys_with_fewer_neighbours_than_the_policy_requires_is_refused() -> None:
    nodes = [11, 22, 33]
    contexts = _contexts(nodes, {"policy.min_secure_agg_participants": 3})
    coordinator = Coordinator(fedtune_site(), contexts)
    assert not any(r.has_error() for r in coordinator.setup(nodes, threshold=2).values())

    # The setup announced 3 sites; site 11 is then shown only itself and one other.
    replies = coordinator.share_keys([11], neighbours={11: [11, 22]})

    assert _code(replies[11]) is RefusalCode.SECURE_AGG_PARTICIPANTS and not replies[11].has_content()
    assert RECORD_KEY_STATE not in contexts[11].state.config_records


def test_share_keys_with_more_neighbours_than_announced_is_refused() -> None:
    nodes = [11, 22, 33, 44]
    contexts = _contexts(nodes)
    coordinator = Coordinator(fedtune_site(), contexts)
    coordinator.setup(nodes, threshold=2, sample_num=3, share_num=3)  # 2 of 3 announced, 4 keys delivered

    reply = coordinator.share_keys([11], neighbours={11: nodes})[11]

    assert _code(reply) is RefusalCode.SECURE_AGG_PROTOCOL and not reply.has_content()


def test_a_ciphertext_that_does_not_decrypt_is_a_protocol_refusal_not_a_crash() -> None:
    nodes = [11, 22, 33]
    coordinator = Coordinator(fedtune_site(), _contexts(nodes))
    coordinator.setup(nodes, threshold=2)
    coordinator.share_keys(nodes)
    srcs, ciphertexts = coordinator.forward[22]
    coordinator.forward[22] = (srcs, [c[:-4] + b"oops" for c in ciphertexts])

    reply = coordinator.collect_masked_vectors([22])[22]

    assert _code(reply) is RefusalCode.SECURE_AGG_PROTOCOL
