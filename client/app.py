"""The site's Flower ClientApp: DP-LoRA training and evaluation on local data.

What leaves the site is exactly: the adapter tensors (LoRA A/B and the trained head), scalar
metrics, and the site's name. Never text, token ids, labels or per-example values.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.common.config import RunConfig, from_flat
from fedtune.common.errors import FedtuneError
from fedtune.common.model import ModelBundle, adapter_state, build_model, load_adapter_state, load_tokenizer
from fedtune.common.tasks import encode, evaluate

logger = logging.getLogger(__name__)

# A site's refusal (budget, data, protocol) travels as a typed error reply, never a crash.
FEDTUNE_ERROR_CODE = 100


def _run_config(context: Context, overrides: dict[str, Any]) -> RunConfig:
    # Flower forbids changing context.run_config on the client side, so the injected config is
    # merged here instead.
    return from_flat({**dict(context.run_config), **overrides})


_MODELS: dict[Any, ModelBundle] = {}


def _model(run: RunConfig, num_labels: int) -> ModelBundle:
    """Build the PEFT model once per process; every message then loads the full adapter into it."""
    key = (run.model, run.lora, num_labels)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_model(run.model, run.lora, num_labels, seed=run.seed)
    return _MODELS[key]


_TOKENIZERS: dict[Any, Any] = {}


def _tokenizer(run: RunConfig):  # type: ignore[no-untyped-def]
    if run.model not in _TOKENIZERS:
        _TOKENIZERS[run.model] = load_tokenizer(run.model)
    return _TOKENIZERS[run.model]


@dataclass(frozen=True)
class _Request:
    run: RunConfig
    round: int
    num_rounds: int
    labels: list[str]
    run_dir: str
    arrays: ArrayRecord


def _request(msg: Message, context: Context, overrides: dict[str, Any]) -> _Request:
    config = msg.content["config"]
    return _Request(
        run=_run_config(context, overrides),
        round=int(config["server-round"]),
        num_rounds=int(config["num-rounds"]),
        labels=[str(x) for x in config["labels"]],
        run_dir=str(config["run-dir"]),
        arrays=msg.content["arrays"],
    )


def _site_seed(seed: int, name: str, server_round: int) -> int:
    """A per-site, per-round seed that is stable across processes (unlike ``hash``)."""
    return zlib.crc32(f"{seed}/{name}/{server_round}".encode()) & 0x7FFFFFFF


def _guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedtuneError as err:
            logger.warning("refused %s: %s", msg.metadata.message_type, err)
            return Message(Error(code=FEDTUNE_ERROR_CODE, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    wrapper.__name__ = handler.__name__
    return wrapper


def handle_train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    from fedtune.client.local import prepare_site, train_round

    req = _request(msg, context, overrides)
    site = prepare_site(req.run, context, run_dir=req.run_dir, labels=req.labels)
    bundle = _model(req.run, len(req.labels))
    load_adapter_state(bundle.model, req.arrays.to_torch_state_dict())
    dataset = encode(_tokenizer(req.run), site.examples.train_texts, site.examples.train_labels, req.labels, max_length=req.run.model.max_length)
    report = train_round(
        bundle.model,
        dataset,
        site=site,
        run=req.run,
        run_id=str(context.run_id),
        server_round=req.round,
        num_rounds=req.num_rounds,
        seed=_site_seed(req.run.seed, site.settings.name, req.round),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(adapter_state(bundle.model)),
            "metrics": MetricRecord(report),
            "site": ConfigRecord({"name": site.settings.name}),
        }
    )
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    from fedtune.client.local import prepare_site

    req = _request(msg, context, overrides)
    site = prepare_site(req.run, context, run_dir=req.run_dir, labels=req.labels)
    if not site.examples.val_texts:
        raise FedtuneError(f"site {site.settings.name} has no validation examples (data.val_fraction is 0).")
    bundle = _model(req.run, len(req.labels))
    load_adapter_state(bundle.model, req.arrays.to_torch_state_dict())
    dataset = encode(_tokenizer(req.run), site.examples.val_texts, site.examples.val_labels, req.labels, max_length=req.run.model.max_length)
    result = evaluate(bundle.model, dataset, len(req.labels))
    metrics = MetricRecord(
        {"num-examples": result.examples, "loss": result.loss, "accuracy": result.accuracy, "macro-f1": result.macro_f1}
    )
    return Message(RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site.settings.name})}), reply_to=msg)


def build_client_app(run_config: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``run_config`` (flat, Flower form) fills the context when the runtime gives none.

    ``flwr run`` passes the run config through Flower's context; ``fedtune simulate`` injects the
    resolved config here, so both run exactly the same handlers.
    """
    client_app = ClientApp()
    overrides = dict(run_config or {})

    @client_app.train()
    @_guarded
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, overrides)

    @client_app.evaluate()
    @_guarded
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, overrides)

    return client_app


app = build_client_app()
