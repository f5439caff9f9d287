"""The site's Flower ClientApp: a thin adapter between Flower messages and the site's handlers.

What leaves the site is exactly what ``common/messages.py`` declares: the adapter tensors (LoRA
A/B and the trained head), the round's privacy parameters, statistics only as the site's policy
releases them, and the site's name; or a refusal code. Never text, token ids, labels, per-example
values, file paths or tracebacks: those stay in the site's own log.

Deployed, Flower starts a fresh process for every message. When the site daemon runs a warm
worker (``node_config["worker-address"]``), this module forwards the message to it and stays
light (no torch import), so a round costs the process start, not a model load; otherwise the
handlers run in this process.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

logger = logging.getLogger(__name__)

# Opacus computes per-example gradients from a module's activations and the gradient with respect to
# its *outputs* (its backward hook reads grad_output only). The first LoRA layer's inputs come from
# frozen weights and need no gradient, so PyTorch warns, once per process (each simulated site's
# Ray actor), that grad_input is unavailable: nothing DP-SGD uses is missing. That one warning only;
# set here because this module is what every site process (ClientApp, Ray actor) imports first.
warnings.filterwarnings(
    "ignore", message=r"Full backward hook is firing when gradients are computed with respect to module outputs", category=UserWarning,
)

# A site's refusal (budget, data, protocol, policy) travels as a typed error reply, never a crash.
FEDTUNE_ERROR_CODE = 100  # common.messages.REFUSAL_ERROR_CODE, kept here so this module stays light
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


def site_label(node_config: Any) -> str:
    """The site's name as the coordinator knows it (never a path or anything read from data)."""
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    return "site"


def refusal(msg: Message, kind: str, err: Exception, context: Context | None = None) -> Message:
    """A typed error reply carrying only a refusal code and the site's name.

    The details (setting, limit, value asked; a data file's row; a traceback) go to this site's
    log only: a refusal must not become a query the coordinator can run on private data.
    """
    from fedtune.common.messages import Refusal, RefusalCode

    code_value = str(getattr(err, "code", RefusalCode.INTERNAL_ERROR.value))
    try:
        code = RefusalCode(code_value)
    except ValueError:
        code = RefusalCode.INTERNAL_ERROR
    site = site_label(context.node_config) if context is not None else "site"
    if code is RefusalCode.INTERNAL_ERROR and not hasattr(err, "code"):
        logger.error("refused %s (%s): internal error", kind, code.value, exc_info=err)
    else:
        logger.warning("refused %s (%s): %s", kind, code.value, getattr(err, "detail", None) or err)
    return Message(Error(code=FEDTUNE_ERROR_CODE, reason=Refusal(site=site, code=code).reason()), reply_to=msg)


def _serve(msg: Message, context: Context, kind: str, overrides: dict[str, Any]) -> Message:
    from fedtune.common.messages import check_outgoing_metrics

    from .faults import InjectedCrash

    try:
        arrays = OrderedDict((k, arr.numpy()) for k, arr in msg.content["arrays"].items())
        reply = site_reply(context, kind, overrides, arrays, dict(msg.content["config"]))
        # The last check before anything leaves: the reply must be the declared message type.
        check_outgoing_metrics(kind, reply.metrics)
    except InjectedCrash:  # `--fail-site NAME@ROUND:crash` (simulated sites only): crash as a real ClientApp does
        raise
    except Exception as err:  # every failure, ours or a library's, leaves as a code only
        return refusal(msg, kind, err, context)
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
        try:
            from .policy import policy_for

            policy_for(context.node_config).check_plain_train()  # a site may insist on secure aggregation
        except Exception as err:
            return refusal(msg, "train", err, context)
        return _serve(msg, context, "train", overrides)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _serve(msg, context, "evaluate", overrides)

    @client_app.query()
    def ready(msg: Message, context: Context) -> Message:
        """Simulation only: load the site's libraries before round 1 and say its name.

        The coordinator waits for this before round 1, so that a round's deadline measures the
        round, not the simulation engine's start-up. A deployed site answers only train and evaluate.
        """
        from fedtune.common.errors import PolicyRefusal
        from fedtune.common.messages import RefusalCode

        if "partition-id" not in context.node_config:
            return refusal(msg, "query", PolicyRefusal(RefusalCode.BAD_REQUEST, "a deployed site answers train and evaluate only"), context)
        import fedtune.client.handlers  # noqa: F401  (torch, PEFT, Opacus: the bulk of a first message's time)

        return Message(RecordDict({"site": ConfigRecord({"name": site_label(context.node_config)})}), reply_to=msg)

    return client_app


app = build_client_app()
