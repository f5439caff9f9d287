"""Secure aggregation on the site: Flower's SecAgg+ client protocol around fedtune's train handler.

Flower's ``secaggplus_mod`` runs the protocol (Bell et al. 2020, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead"; Bonawitz et al. 2017): keys, Shamir shares of two secrets per
site (``sk1``, the key behind its pairwise masks, and ``b``, the seed of its private mask), and
masking. In its masking stage it calls the next handler with legacy fit instructions
(``fitins.*`` records, tensors as an unnamed list) and expects legacy fit results (``fitres.*``).
The bridge here translates both ways around the site's ordinary train handler and, since the mod
trusts the coordinator, inspects every stage message *before* the mod sees it:

- setup: the threshold t and the share-holder count must meet the site's policy
  (``[policy] min_secure_agg_threshold / min_secure_agg_participants``), and t must exceed half
  the share-holders (see :func:`_check_setup` for why);
- share keys: the neighbours the coordinator names must be no more than the setup announced and
  at least the policy's minimum;
- unmask: no node may be listed both active and dropped, this site may not be called dropped
  (it sent its masked vector), every node named must be one whose shares this site holds, and
  the active list must reach t. The mod answers an unmask message with the ``b`` share of every
  "active" node and the ``sk1`` share of every "dropped" one; a node in both lists would hand
  the coordinator shares of both secrets of that node, enough (from t sites) to strip its masks.

And around the handler:

- the tensor names the coordinator sent must match the site's reply, in order;
- an adapter value outside the clipping range, or more examples than the protocol's maximum
  weight, would be clipped silently by quantization: the site refuses the round instead;
- the reply's metrics must be the declared ``TrainReply`` (``common/messages.py``).

Every refusal or protocol error becomes a typed error reply (a code and the site's name; a
dropout the protocol tolerates within its threshold), never a crash, and the site forgets the
round's secrets: it answers no further stage of that round. The secrets are also dropped after a
completed unmask stage.

What these checks do not give (out of scope here, stated in the threat model): Flower's SecAgg+
has no consistency round (Bonawitz et al. 2017, section 4.4: sites sign the survivor list and
check each other's signatures), so a coordinator can show different sites different, each
self-consistent, active/dropped lists and learn the sum of fewer than t sites' updates; and the
sites' public keys reach each other only through the coordinator, unsigned, so a coordinator that
substitutes its own keys can decrypt the shares. Both need site identity keys the coordinator does
not control.

The reply that leaves the site carries the masked vector, the scalar metrics and the site's name;
the mod clears the adapter tensors before it goes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, NoReturn

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune.common.errors import FedtuneError, PolicyRefusal
from fedtune.common.messages import ARRAY_NAMES_KEY, MAX_WEIGHT_KEY, RefusalCode, check_outgoing_metrics

from .app import refusal, site_reply

logger = logging.getLogger(__name__)

KIND = "secure train"


class _HandlerFailed(Exception):
    """Carries an exception of the site's own train handler past the mod, so that it keeps its code
    (a budget refusal stays a budget refusal) and is not mistaken for a protocol error."""


def secure_train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Answer one SecAgg+ message; the protocol state lives in ``context.state`` between messages."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Stage

    from fedtune.common.masks import install

    from .policy import policy_for

    install()  # 256-bit mask generator on both ends (see common/masks.py)

    def fit(fit_msg: Message, ctxt: Context) -> Message:
        try:
            return Message(_fit(fit_msg.content, ctxt, overrides), reply_to=fit_msg)
        except Exception as err:
            raise _HandlerFailed() from err

    try:
        stage = check_stage_message(msg, context, policy_for(context.node_config))
        reply = secaggplus_mod(msg, context, fit)
    except _HandlerFailed as wrapped:
        return _refuse(msg, context, wrapped.__cause__ or wrapped)
    except FedtuneError as err:  # the checks above, or the site's own policy file
        return _refuse(msg, context, err)
    except Exception as err:  # the mod's own checks (ValueError, KeyError, ...), a bad ciphertext
        logger.debug("secure aggregation protocol error", exc_info=err)
        return _refuse(msg, context, PolicyRefusal(RefusalCode.SECURE_AGG_PROTOCOL,
                                                   f"secure aggregation protocol error: {type(err).__name__}: {err}"))
    if stage == Stage.UNMASK:  # the round is over for this site: its secrets are not kept
        context.state.config_records.pop(RECORD_KEY_STATE, None)
    return reply


def _refuse(msg: Message, context: Context, err: BaseException) -> Message:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    # Forget the round's keys and shares: a refused round can never be resumed, so no later
    # message (say, a second unmask with other lists) can draw shares from this site.
    context.state.config_records.pop(RECORD_KEY_STATE, None)
    return refusal(msg, KIND, err if isinstance(err, Exception) else Exception(str(err)), context)


# -- the checks on each stage message, before the mod sees it ------------------------------------
def check_stage_message(msg: Message, context: Context, policy: Any) -> str:
    """Refuse (PolicyRefusal) a SecAgg+ stage message that the site's policy or the protocol forbids.

    ``policy`` is the site's ``SitePolicy``. Returns the stage named in the message. Reads the
    protocol state the mod left in ``context.state`` (threshold, neighbours, shares held).
    """
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if not isinstance(stage, str) or stage not in Stage.all():
        _protocol(f"unknown SecAgg+ stage {stage!r}")
    if stage == Stage.SETUP:  # a setup may always (re)start a round; the mod then forgets the old one
        _check_setup(configs, policy)
        return stage
    record = context.state.config_records.get(RECORD_KEY_STATE)
    state = SecAggPlusState(**dict(record)) if record is not None else SecAggPlusState()
    stages = Stage.all()
    expected_previous = stages[stages.index(stage) - 1]
    if record is None or state.current_stage != expected_previous:
        _protocol(f"stage {stage!r} after {state.current_stage if record is not None else 'no setup'!r}; "
                  f"expected it after {expected_previous!r}")
    if stage == Stage.SHARE_KEYS:
        _check_share_keys(configs, state, policy)
    elif stage == Stage.UNMASK:
        _check_unmask(configs, state)
    return stage


def _check_setup(configs: Any, policy: Any) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    threshold = _int(configs, Key.THRESHOLD)
    sample_num = _int(configs, Key.SAMPLE_NUMBER)
    share_num = _int(configs, Key.SHARE_NUMBER)
    # The sites that can hold shares of this site's secrets: its neighbours, itself included
    # (share_num may exceed the sample, in which case every sampled site is a neighbour).
    holders = min(sample_num, share_num)
    policy.check_secure_round(threshold=threshold, participants=holders)
    if threshold > holders:
        _protocol(f"SecAgg+ threshold {threshold} exceeds the {holders} sites that would hold shares: no secret could be recovered")
    # Why a majority: in the unmask stage each honest site reveals, for each neighbour, either its
    # mask-seed share (neighbour active) or its key share (neighbour dropped), never both (checked
    # at unmask). To strip a site's masks the coordinator needs t shares of each secret, so two
    # *disjoint* groups of t share-holders. With t > holders / 2 two such groups cannot exist;
    # with t <= holders / 2 a coordinator that calls the site active to one half and dropped to the
    # other half unmasks it (and any t colluding sites, here a minority, could do so outright).
    if 2 * threshold <= holders:
        raise PolicyRefusal(RefusalCode.SECURE_AGG_THRESHOLD,
                            f"SecAgg+ threshold is {threshold} of {holders} share-holders; this site requires more than half "
                            f"({holders // 2 + 1} or more), else a minority of share-holders can unmask a site")


def _check_share_keys(configs: Any, state: Any, policy: Any) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    try:
        neighbours = {int(k) for k in configs if k != Key.STAGE}
    except ValueError:
        _protocol("share-keys stage names a node that is not an integer id")
    announced = min(int(state.sample_num), int(state.share_num))
    if len(neighbours) > announced:
        _protocol(f"share-keys stage names {len(neighbours)} neighbours; the setup announced at most {announced}")
    # The neighbours that actually take part: the setup's counts are only the coordinator's word.
    policy.check_secure_round(threshold=int(state.threshold), participants=len(neighbours))


def _check_unmask(configs: Any, state: Any) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    active = _int_list(configs, Key.ACTIVE_NODE_ID_LIST)
    dropped = _int_list(configs, Key.DEAD_NODE_ID_LIST)
    both = sorted(set(active) & set(dropped))
    if both:
        raise PolicyRefusal(RefusalCode.SECURE_AGG_DROPPED,
                            f"unmask stage lists nodes {both} as both active and dropped: answering would hand out shares of "
                            "both of their secrets (mask seed and pairwise key), enough to strip their masks")
    if int(state.nid) in dropped:
        raise PolicyRefusal(RefusalCode.SECURE_AGG_DROPPED,
                            f"unmask stage lists this site (node {state.nid}) as dropped, but it sent its masked vector: "
                            "answering would hand out a share of its own pairwise key")
    if len(set(active)) != len(active) or len(set(dropped)) != len(dropped):
        _protocol("unmask stage lists a node twice")
    # The nodes whose shares this site holds: itself and the neighbours whose encrypted shares
    # reached it; anything else was not part of this site's round.
    held = set(state.rd_seed_share_dict)
    strangers = sorted((set(active) | set(dropped)) - held)
    if strangers:
        _protocol(f"unmask stage names nodes {strangers} that were not among this site's neighbours in the round")
    if len(active) < int(state.threshold):
        _protocol(f"unmask stage lists {len(active)} active nodes, below the round's threshold {state.threshold}")


def _int(configs: Any, key: str) -> int:
    value = configs.get(key)
    if type(value) is not int:  # bool is an int subclass; the mod requires int proper
        _protocol(f"setup value {key!r} must be an integer, got {type(value).__name__}")
    return int(value)


def _int_list(configs: Any, key: str) -> list[int]:
    values = configs.get(key)
    if not isinstance(values, list) or any(type(v) is not int for v in values):
        _protocol(f"unmask value {key!r} must be a list of integer node ids")
    return [int(v) for v in values]


def _protocol(detail: str) -> NoReturn:
    raise PolicyRefusal(RefusalCode.SECURE_AGG_PROTOCOL, detail)


# -- the masking stage: fedtune's train handler behind Flower's legacy fit ---------------------------
def _fit(content: RecordDict, ctxt: Context, overrides: dict[str, Any]) -> RecordDict:
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_STATE,
        Key,
    )

    config = dict(content.config_records["fitins.config"])
    names = [str(n) for n in config.pop(ARRAY_NAMES_KEY, [])]
    tensors = [arr.numpy() for arr in content.array_records["fitins.parameters"].values()]
    if not names or len(names) != len(tensors):
        raise PolicyRefusal(RefusalCode.SECURE_AGG_PROTOCOL, f"secure round sent {len(tensors)} tensors with {len(names)} names; they must match")
    protocol = ctxt.state.config_records[RECORD_KEY_STATE]
    clipping_range = float(protocol[Key.CLIPPING_RANGE])  # type: ignore[arg-type]
    max_weight = float(protocol[Key.MAX_WEIGHT])  # type: ignore[arg-type]

    config[MAX_WEIGHT_KEY] = max_weight  # the handler refuses before training, so no budget is spent
    reply = site_reply(ctxt, "train", overrides, OrderedDict(zip(names, tensors, strict=True)), config)
    if reply.arrays is None or list(reply.arrays.keys()) != names:
        raise PolicyRefusal(RefusalCode.SECURE_AGG_PROTOCOL, "the site's adapter tensors differ from the ones the coordinator sent")
    check_outgoing_metrics("train", reply.metrics)  # the last check before anything leaves
    n = int(reply.metrics["num-examples"])
    if n > max_weight:
        raise PolicyRefusal(
            RefusalCode.SECURE_AGG_MAX_WEIGHT,
            f"site has {n} training examples, above the secure-aggregation max weight {max_weight:g}; "
            "the coordinator must raise secure_agg.max_weight",
        )
    for name, value in reply.arrays.items():
        peak = float(np.abs(value).max()) if value.size else 0.0
        if not np.isfinite(peak) or peak > clipping_range:
            raise PolicyRefusal(
                RefusalCode.SECURE_AGG_RANGE,
                f"adapter tensor {name} reaches {peak:.4g}, outside the secure-aggregation clipping range "
                f"+-{clipping_range:g}; the coordinator must raise secure_agg.clipping_range",
            )
    return RecordDict(
        {
            "fitres.parameters": ArrayRecord(
                # float64: Flower quantizes in the update's dtype, and float32 (v + c) loses ~1e-4 of the mean at c = 8.
                OrderedDict((str(i), Array.from_numpy_ndarray(reply.arrays[name].astype(np.float64))) for i, name in enumerate(names))
            ),
            "fitres.num_examples": MetricRecord({"num_examples": n}),
            "fitres.metrics": ConfigRecord(dict(reply.metrics)),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
            "site": ConfigRecord({"name": reply.site}),
        }
    )
