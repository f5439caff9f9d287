"""What a site does for one message, on plain data: no Flower types, so a warm worker can run it too.

The model is built once per process and the full adapter is loaded into it on every request, so a
process that serves many messages (a simulation actor, the site's warm worker) pays the base-model
load once.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from fedtune.common.config import RunConfig, from_flat
from fedtune.common.errors import FedtuneError
from fedtune.common.model import (
    ModelBundle,
    adapter_state,
    base_model_id,
    build_model,
    load_adapter_state,
    load_tokenizer,
    resolve_base_model,
)
from fedtune.common.protocol import BASE_MODEL_ID_KEY, MAX_WEIGHT_KEY, VALIDATE_FIRST_KEY
from fedtune.common.tasks import encode, evaluate

from .site_request import SiteReply, SiteRequest

logger = logging.getLogger(__name__)


_MODELS: dict[Any, ModelBundle] = {}
_TOKENIZERS: dict[Any, Any] = {}


def _model(run: RunConfig, num_labels: int) -> ModelBundle:
    key = (run.model, run.lora, num_labels)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_model(run.model, run.lora, num_labels, seed=run.seed)
    return _MODELS[key]


def _tokenizer(run: RunConfig):  # type: ignore[no-untyped-def]
    if run.model not in _TOKENIZERS:
        _TOKENIZERS[run.model] = load_tokenizer(run.model)
    return _TOKENIZERS[run.model]


def _site_seed(seed: int, name: str, server_round: int) -> int:
    """A per-site, per-round seed that is stable across processes (unlike ``hash``)."""
    return zlib.crc32(f"{seed}/{name}/{server_round}".encode()) & 0x7FFFFFFF


def _site_model(run: RunConfig, settings: Any, expected_id: Any) -> RunConfig:
    """A deployed site loads its own base model (site.toml), never a folder the coordinator names,
    and refuses a run whose model differs from it."""
    if settings.base_model is not None:
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, base_model=settings.base_model))
    if expected_id is not None and base_model_id(run.model) != str(expected_id):
        raise FedtuneError(
            f"site {settings.name}: its base model ({resolve_base_model(run.model)}, id {base_model_id(run.model)}) "
            f"is not the run's (id {expected_id}); set [model] base_model in site.toml to the run's model folder."
        )
    return run


def _validate(bundle: ModelBundle, tokenizer: Any, site: Any, labels: list[str], run: RunConfig, *, prefix: str = "") -> dict[str, int | float]:
    """Examples, loss, accuracy and macro-F1 of the loaded adapter on the site's validation split
    (keys prefixed with ``prefix``; none: {})."""
    if not site.examples.val_texts:
        return {}
    dataset = encode(tokenizer, site.examples.val_texts, site.examples.val_labels, labels, max_length=run.model.max_length)
    result = evaluate(bundle.model, dataset, len(labels))
    values = {"examples": result.examples, "loss": result.loss, "accuracy": result.accuracy, "macro-f1": result.macro_f1}
    return {prefix + k: v for k, v in values.items()}


def handle(req: SiteRequest) -> SiteReply:
    """Serve one request. Raises FedtuneError (budget, data, protocol) for a typed refusal."""
    from .local import prepare_site, train_round

    run = from_flat(req.run_config)
    labels = [str(x) for x in req.config["labels"]]
    server_round = int(req.config["server-round"])
    site = prepare_site(run, req.node_config, run_dir=str(req.config["run-dir"]), labels=labels)
    run = _site_model(run, site.settings, req.config.get(BASE_MODEL_ID_KEY))
    bundle = _model(run, len(labels))
    load_adapter_state(bundle.model, {k: torch.from_numpy(np.asarray(v)) for k, v in req.arrays.items()})
    tokenizer = _tokenizer(run)
    if req.kind == "train":
        max_weight = req.config.get(MAX_WEIGHT_KEY)
        if max_weight is not None and len(site.examples.train_texts) > float(max_weight):
            # Checked before training: a refused secure round must not spend privacy budget.
            raise FedtuneError(
                f"site {site.settings.name} has {len(site.examples.train_texts)} training examples, above the "
                f"secure-aggregation max weight {float(max_weight):g}; the coordinator must raise secure_agg.max_weight"
            )
        # The received global adapter is validated here, before training, in the same message: a
        # separate evaluate exchange would cost a second ClientApp process start every round.
        validation = _validate(bundle, tokenizer, site, labels, run, prefix="val-") if req.config.get(VALIDATE_FIRST_KEY) else {}
        dataset = encode(tokenizer, site.examples.train_texts, site.examples.train_labels, labels, max_length=run.model.max_length)
        metrics = train_round(
            bundle.model, dataset, site=site, run=run, run_id=str(req.run_id), server_round=server_round,
            num_rounds=int(req.config["num-rounds"]), seed=_site_seed(run.seed, site.settings.name, server_round),
        )
        arrays = OrderedDict((k, v.numpy()) for k, v in adapter_state(bundle.model).items())
        return SiteReply(site=site.settings.name, metrics={**metrics, **validation}, arrays=arrays)
    if req.kind == "evaluate":
        scores = _validate(bundle, tokenizer, site, labels, run)
        if not scores:
            raise FedtuneError(f"site {site.settings.name} has no validation examples (data.val_fraction is 0).")
        scores["num-examples"] = scores.pop("examples")
        return SiteReply(site=site.settings.name, metrics=scores)
    raise FedtuneError(f"unknown request kind {req.kind!r}; expected 'train' or 'evaluate'.")
