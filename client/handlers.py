"""What a site does for one message, on plain data: no Flower types, so a warm worker can run it too.

The model is built once per process and the full adapter is loaded into it on every request, so a
process that serves many messages (a simulation actor, the site's warm worker) pays the base-model
load once.

A site whose policy caps the LoRA rank (``[policy] max_lora_rank``; ``lora.site_ranks`` in
simulation) builds its model at r_i = min(r, cap), keeps the first r_i rank slots of the global
adapter it receives, trains and validates that, and replies at rank r_i; the coordinator pads the
reply with the global adapter's values in the slots it did not train (``common/lora_rank.py``).
In a SecAgg+ round the site pads its own reply to rank r before masking, with the global adapter
it received: the protocol sums equal-length vectors, and those values are what the coordinator
would have padded with (the site's update is zero in the slots it did not train).
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
from fedtune.common.errors import PolicyRefusal, UpdateError
from fedtune.common.messages import (
    MAX_WEIGHT_KEY,
    EvaluateReply,
    RefusalCode,
    RoundInstructions,
    TrainingStats,
    TrainReply,
    ValidationStats,
    round_significant,
)
from fedtune.common.lora_rank import adapter_rank, pad_lora, truncate_lora
from fedtune.common.model import (
    ModelBundle,
    adapter_state,
    base_model_id,
    build_run_model,
    load_adapter_state,
    load_tokenizer,
    resolve_base_model,
    uses_ffa,
)
from fedtune.common.lm_site import empty_dataset
from fedtune.common.tasks import encode

from .faults import after_training, before_training, site_fault
from .local import PreparedSite
from .site_request import SiteReply, SiteRequest

logger = logging.getLogger(__name__)


_MODELS: dict[Any, ModelBundle] = {}
_TOKENIZERS: dict[Any, Any] = {}


def _model(run: RunConfig, num_labels: int, rank: int | None = None) -> ModelBundle:
    # Under FFA-LoRA the frozen A comes from the run's seed, not from the received adapter: a model
    # cached for another mode or seed would train against another A. ``rank``: the site's LoRA rank
    # (None: the run's).
    ffa = uses_ffa(run)
    rank = run.lora.rank if rank is None else rank
    key = (run.task, run.model, run.lora, num_labels, ffa, run.seed if ffa else None, rank)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_run_model(run, num_labels, site_rank=rank)
    return _MODELS[key]


def _tokenizer(run: RunConfig):  # type: ignore[no-untyped-def]
    key = (run.model, run.task)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(run.model, run.task)
    return _TOKENIZERS[key]


def _site_seed(seed: int, name: str, server_round: int) -> int:
    """A per-site, per-round seed that is stable across processes (unlike ``hash``)."""
    return zlib.crc32(f"{seed}/{name}/{server_round}".encode()) & 0x7FFFFFFF


def _site_model(run: RunConfig, settings: Any, expected_id: str) -> RunConfig:
    """A deployed site loads its own base model (site.toml), never a folder the coordinator names,
    and refuses a run whose model differs from it."""
    if settings.base_model is not None:
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, base_model=settings.base_model))
    if expected_id and base_model_id(run.model, run.task) != expected_id:
        raise PolicyRefusal(
            RefusalCode.MODEL_MISMATCH,
            f"site {settings.name}: its base model ({resolve_base_model(run.model, run.task)}, id {base_model_id(run.model, run.task)}) "
            f"is not the run's (id {expected_id}); set [model] base_model in site.toml to the run's model folder.",
        )
    return run


def _round_seed(run: RunConfig, site: PreparedSite, server_round: int, salt: str = "") -> int | None:
    """Simulated sites are reproducible; deployed ones draw from OS entropy (None)."""
    return _site_seed(run.seed, site.settings.name + salt, server_round) if site.settings.simulated else None


def _validation(bundle: ModelBundle, tokenizer: Any, site: PreparedSite, labels: list[str], run: RunConfig, *,
                run_id: str, server_round: int, required: bool) -> ValidationStats | None:
    """Validation of the loaded adapter on the site's own validation split, as its policy releases it."""
    from .ledger import PrivacyLedger
    from .statistics import ReleaseContext, noise_generator, release_validation

    ex = site.examples
    if site.lm is not None:  # causal-lm: encoded when the site was prepared
        dataset = site.lm.val.dataset if site.lm.val is not None else empty_dataset()
    else:
        dataset = encode(tokenizer, ex.val_texts, ex.val_labels, labels, max_length=run.max_length)
    charge = ReleaseContext(
        ledger=PrivacyLedger(site.settings.state_dir), records=site.val_records, all_records=site.all_records, run=run_id, round=server_round,
        delta=site.settings.delta, budget_epsilon=site.settings.budget_epsilon, accountant=run.privacy.accountant,
    )
    return release_validation(bundle.model, dataset, len(labels), policy=site.settings.policy, charge=charge,
                              rng=noise_generator(_round_seed(run, site, server_round, "/statistics")), required=required,
                              causal_lm=run.causal_lm)


def handle(req: SiteRequest) -> SiteReply:
    """Serve one request. Raises FedtuneError (policy, budget, data, protocol) for a typed refusal."""
    from .local import prepare_site, train_round
    from .site import resolve_site
    from .train import proximal_reference

    run = from_flat(req.run_config)
    instructions = RoundInstructions.from_config(req.config)
    labels = list(instructions.labels)
    server_round = instructions.server_round
    # Before anything is read: a deployed site refuses a run that carries a fault plan.
    fault = site_fault(run, req.node_config, server_round=server_round, kind=req.kind)
    if run.causal_lm:  # the site's own model first: its tokenizer encodes the examples (labels do not apply)
        run = _site_model(run, resolve_site(req.node_config, run, run_dir=instructions.run_dir), instructions.base_model_id)
        site = prepare_site(run, req.node_config, run_dir=instructions.run_dir, labels=labels, tokenizer=_tokenizer(run))
    else:
        site = prepare_site(run, req.node_config, run_dir=instructions.run_dir, labels=labels)
        run = _site_model(run, site.settings, instructions.base_model_id)
    rank = site.settings.policy.lora_rank(run.lora.rank)
    if rank < run.lora.rank:
        logger.info("%s trains LoRA rank %d of the run's %d (its policy's max_lora_rank)", site.settings.name, rank, run.lora.rank)
    bundle = _model(run, len(labels), rank)
    received = {k: torch.from_numpy(np.asarray(v)) for k, v in req.arrays.items()}
    global_adapter = received  # the rank-r adapter as received: a secure reply is padded with it
    if rank < run.lora.rank:
        # Truncated only from the run's own rank: a larger adapter must be refused, not cut to fit.
        sent = adapter_rank({k: tuple(v.shape) for k, v in received.items()})
        if sent not in (None, run.lora.rank):
            raise UpdateError(f"received adapter has LoRA rank {sent}, but the run's lora.rank is {run.lora.rank}.")
        received = truncate_lora(received, rank)
    load_adapter_state(bundle.model, received)
    # FedProx's w_g is the adapter as received, taken before anything else touches the model.
    reference = proximal_reference(bundle.model) if req.kind == "train" and run.train.proximal_mu > 0 else None
    tokenizer = _tokenizer(run)
    # The coordinator's run identity survives its crash and resume (a new Flower run id); the
    # ledger's noise plan and charges stay under it. The budget check never depends on it.
    run_id = instructions.run_id or str(req.run_id)
    if req.kind == "train":
        before_training(fault, run)  # an injected refusal or hang comes before any charge
        n = site.train_size
        max_weight = req.config.get(MAX_WEIGHT_KEY)
        if max_weight is not None and n > float(max_weight):
            # Checked before training: a refused secure round must not spend privacy budget.
            raise PolicyRefusal(RefusalCode.SECURE_AGG_MAX_WEIGHT, f"site {site.settings.name} has {n} training examples, above "
                                f"the secure-aggregation max weight {float(max_weight):g}; the coordinator must raise secure_agg.max_weight")
        # The received global adapter is validated here, before training, in the same message: a
        # separate evaluate exchange would cost a second ClientApp process start every round.
        validation = (_validation(bundle, tokenizer, site, labels, run, run_id=run_id, server_round=server_round, required=False)
                      if instructions.validate_first else None)
        dataset = (site.lm.train.dataset if site.lm is not None else
                   encode(tokenizer, site.examples.train_texts, site.examples.train_labels, labels, max_length=run.max_length))
        privacy, result = train_round(
            bundle.model, dataset, site=site, run=run, run_id=run_id, server_round=server_round,
            num_rounds=instructions.num_rounds, seed=_site_seed(run.seed, site.settings.name, server_round),
            proximal_reference=reference,
        )
        after_training(fault)  # an injected crash comes after the charge: privacy is spent when noise is drawn
        clear = site.settings.policy.statistics == "clear"
        reply = TrainReply(
            site=site.settings.name,
            weight=max(1, int(round_significant(n))),
            privacy=privacy,
            validation=validation,
            training=TrainingStats(loss=result.loss, clipped_fraction=result.clipped_fraction, seconds=result.seconds) if clear else None,
        )
        state = adapter_state(bundle.model)
        if max_weight is not None and rank < run.lora.rank:
            # A SecAgg+ round (client/secure_agg.py sets the max weight on its masking stage only):
            # masking needs the global shapes, and the coordinator cannot pad what it cannot see.
            state = pad_lora(state, global_adapter)
        arrays = OrderedDict((k, v.numpy()) for k, v in state.items())
        return SiteReply(site=site.settings.name, metrics=reply.to_metrics(), arrays=arrays)
    if req.kind == "evaluate":
        stats = _validation(bundle, tokenizer, site, labels, run, run_id=run_id, server_round=server_round, required=True)
        if stats is None:  # required=True refuses instead; kept for the type checker
            raise PolicyRefusal(RefusalCode.STATISTICS, "no validation statistics to release.")
        return SiteReply(site=site.settings.name, metrics=EvaluateReply(site=site.settings.name, validation=stats).to_metrics())
    raise UpdateError(f"unknown request kind {req.kind!r}; expected 'train' or 'evaluate'.")
