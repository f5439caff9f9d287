"""The site's Flower ClientApp: a thin adapter between Flower messages and the site's handlers.

What leaves the site is exactly: the adapter tensors (LoRA A/B and the trained head), scalar
metrics, and the site's name. Never text, token ids, labels or per-example values.

Deployed, Flower starts a fresh process for every message. When the site daemon runs a warm
worker (``node_config["worker-address"]``), this module forwards the message to it and stays
light (no torch import), so a round costs the process start, not a model load; otherwise the
handlers run in this process.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

logger = logging.getLogger(__name__)

# A site's refusal (budget, data, protocol) travels as a typed error reply, never a crash.
FEDTUNE_ERROR_CODE = 100
# The record Flower's SecAgg+ protocol messages carry (flwr's RECORD_KEY_CONFIGS), checked
# without importing the protocol module on the plain path.
SECAGG_RECORD = "secaggplus_configs"


def _request(context: Context, kind: str, overrides: dict[str, Any], arrays: OrderedDict[str, Any], config: dict[str, Any]):  # type: ignore[no-untyped-def]
    from .site_request import SiteRequest

    return SiteRequest(
        kind=kind,
        # Flower forbids changing context.run_config on the client side: injected config merges here.
        run_config={**dict(context.run_config), **overrides},
        node_config=dict(context.node_config),
        run_id=int(context.run_id),
        config=config,
        arrays=arrays,
    )


def site_reply(context: Context, kind: str, overrides: dict[str, Any], arrays: OrderedDict[str, Any], config: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The site's answer as plain data (a SiteReply); raises FedtuneError for a typed refusal."""
    request = _request(context, kind, overrides, arrays, config)
    if "worker-address" in context.node_config:
        from .worker import call_worker

        return call_worker(context.node_config, request)
    from .handlers import handle

    return handle(request)


def refusal(msg: Message, kind: str, err: Exception) -> Message:
    """A typed error reply: the coordinator logs the reason and the round goes on without this site."""
    reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"  # a worker's refusal carries its own
    logger.warning("refused %s: %s", kind, reason)
    return Message(Error(code=FEDTUNE_ERROR_CODE, reason=reason), reply_to=msg)


def _serve(msg: Message, context: Context, kind: str, overrides: dict[str, Any]) -> Message:
    from fedtune.common.errors import FedtuneError

    arrays = OrderedDict((k, arr.numpy()) for k, arr in msg.content["arrays"].items())
    try:
        reply = site_reply(context, kind, overrides, arrays, dict(msg.content["config"]))
    except FedtuneError as err:
        return refusal(msg, kind, err)
    records: dict[str, Any] = {"metrics": MetricRecord(reply.metrics), "site": ConfigRecord({"name": reply.site})}
    if reply.arrays is not None:
        records["arrays"] = ArrayRecord(OrderedDict((k, Array.from_numpy_ndarray(v)) for k, v in reply.arrays.items()))
    return Message(RecordDict(records), reply_to=msg)


def build_client_app(run_config: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``run_config`` (flat, Flower form) fills in what the runtime's context lacks.

    ``flwr run`` passes the run config through Flower's context; ``fedtune simulate`` injects the
    resolved config here, so both run exactly the same handlers.
    """
    client_app = ClientApp()
    overrides = dict(run_config or {})

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        if SECAGG_RECORD in msg.content.config_records:  # a SecAgg+ round (see client/secure_agg.py)
            from .secure_agg import secure_train

            return secure_train(msg, context, overrides)
        return _serve(msg, context, "train", overrides)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _serve(msg, context, "evaluate", overrides)

    return client_app


app = build_client_app()
