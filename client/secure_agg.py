"""Secure aggregation on the site: Flower's SecAgg+ client protocol around fedtune's train handler.

Flower's ``secaggplus_mod`` runs the protocol (keys, secret shares, masking) and, in its masking
stage, calls the next handler with legacy fit instructions (``fitins.*`` records, tensors as an
unnamed list) and expects legacy fit results back (``fitres.*``). The bridge here translates both
ways around the site's ordinary train handler and adds what the mod does not check:

- the tensor names the coordinator sent must match the site's reply, in order;
- an adapter value outside the clipping range, or more examples than the protocol's maximum
  weight, would be clipped silently by quantization: the site refuses the round instead;
- every refusal or protocol error becomes a typed error reply (a dropout the protocol tolerates
  within its threshold), never a crash.

The reply that leaves the site carries the masked vector, the scalar metrics and the site's name;
the mod clears the adapter tensors before it goes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune.common.errors import FedtuneError
from fedtune.common.protocol import ARRAY_NAMES_KEY, MAX_WEIGHT_KEY

from .app import refusal, site_reply

logger = logging.getLogger(__name__)


class SecureAggRefusal(FedtuneError):
    """The site cannot take part in this secure round (bounds, names); the reason goes back."""


def secure_train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Answer one SecAgg+ message; the protocol state lives in ``context.state`` between messages."""
    from flwr.client.mod import secaggplus_mod

    from fedtune.common.masks import install

    install()  # 256-bit mask generator on both ends (see common/masks.py)
    def fit(fit_msg: Message, ctxt: Context) -> Message:
        return Message(_fit(fit_msg.content, ctxt, overrides), reply_to=fit_msg)

    try:
        return secaggplus_mod(msg, context, fit)
    except FedtuneError as err:
        return refusal(msg, "secure train", err)
    except (ValueError, KeyError, TypeError) as err:  # the mod's own protocol checks
        return refusal(msg, "secure train", SecureAggRefusal(f"secure aggregation protocol error: {err}"))


def _fit(content: RecordDict, ctxt: Context, overrides: dict[str, Any]) -> RecordDict:
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_STATE,
        Key,
    )

    config = dict(content.config_records["fitins.config"])
    names = [str(n) for n in config.pop(ARRAY_NAMES_KEY, [])]
    tensors = [arr.numpy() for arr in content.array_records["fitins.parameters"].values()]
    if not names or len(names) != len(tensors):
        raise SecureAggRefusal(f"secure round sent {len(tensors)} tensors with {len(names)} names; they must match")
    protocol = ctxt.state.config_records[RECORD_KEY_STATE]
    clipping_range = float(protocol[Key.CLIPPING_RANGE])  # type: ignore[arg-type]
    max_weight = float(protocol[Key.MAX_WEIGHT])  # type: ignore[arg-type]

    config[MAX_WEIGHT_KEY] = max_weight  # the handler refuses before training, so no budget is spent
    reply = site_reply(ctxt, "train", overrides, OrderedDict(zip(names, tensors, strict=True)), config)
    if reply.arrays is None or list(reply.arrays.keys()) != names:
        raise SecureAggRefusal("the site's adapter tensors differ from the ones the coordinator sent")
    n = int(reply.metrics["num-examples"])
    if n > max_weight:
        raise SecureAggRefusal(
            f"site has {n} training examples, above the secure-aggregation max weight {max_weight:g}; "
            "the coordinator must raise secure_agg.max_weight"
        )
    for name, value in reply.arrays.items():
        peak = float(np.abs(value).max()) if value.size else 0.0
        if not np.isfinite(peak) or peak > clipping_range:
            raise SecureAggRefusal(
                f"adapter tensor {name} reaches {peak:.4g}, outside the secure-aggregation clipping range "
                f"+-{clipping_range:g}; the coordinator must raise secure_agg.clipping_range"
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
