"""One round at a site: find its data, check and charge the privacy budget, train, report.

Order matters for privacy: the budget check and the ledger charge happen before any training,
so a refused round trains nothing and a crash mid-round still counts as spent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import TensorDataset

from fedtune.common.accounting import Segment
from fedtune.common.config import RunConfig
from fedtune.common.data import TextTable, check_labels, fingerprint
from fedtune.common.errors import ConfigError, PrivacyBudgetError
from fedtune.common.sitedata import SiteExamples, load_config_table, simulated_split, site_examples

from .ledger import PrivacyLedger
from .site import SiteSettings, resolve_site
from .train import DPSettings, StepPlan, train_local

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedSite:
    settings: SiteSettings
    examples: SiteExamples
    dataset_id: str  # fingerprint of the site's local dataset: the ledger key


def prepare_site(run: RunConfig, node_config: Mapping[str, Any], *, run_dir: str, labels: list[str]) -> PreparedSite:
    settings = resolve_site(node_config, run, run_dir=run_dir)
    table = load_config_table(settings.data)  # cached per process (a warm worker reads its file once)
    if settings.simulated:
        split = simulated_split(table, settings.data, num_sites=settings.num_partitions or run.federation.sites, seed=run.seed)
        if settings.partition is None or settings.partition >= len(split.sites):
            raise ConfigError(f"partition-id {settings.partition} is outside the {len(split.sites)} simulated sites.")
        indices = split.sites[settings.partition]
    else:
        check_labels(table, labels)
        indices = list(range(len(table.labels)))
    examples = site_examples(table, indices, val_fraction=run.data.val_fraction, seed=run.seed + (settings.partition or 0))
    # The ledger key is the site's whole local dataset, never anything the run chooses (seed,
    # validation fraction): a coordinator must not be able to reset a budget by reshuffling.
    local = TextTable(texts=[table.texts[i] for i in indices], labels=[table.labels[i] for i in indices], source=table.source)
    return PreparedSite(settings=settings, examples=examples, dataset_id=fingerprint(local))


def train_round(
    model: torch.nn.Module,
    dataset: TensorDataset,
    *,
    site: PreparedSite,
    run: RunConfig,
    run_id: str,
    server_round: int,
    num_rounds: int,
    seed: int,
) -> dict[str, float | int]:
    """Train one round; returns the scalar metrics the site reports.

    A deployed site ignores ``seed`` and draws its sampling and noise from OS entropy
    (see ``train_local``); a simulated site uses it, so simulations are reproducible.
    """
    n = len(dataset)
    plan = StepPlan.for_dataset(n, run.train)
    privacy = run.privacy
    settings = site.settings
    dp: DPSettings | None = None
    epsilon_spent = 0.0
    if not privacy.enabled and not settings.allow_no_dp:
        raise PrivacyBudgetError(
            f"site {settings.name} trains only with differential privacy; this run has privacy.enabled = false "
            "(the site operator can set [privacy] allow_no_dp = true in site.toml).",
            budget=settings.budget_epsilon, spent=0.0, requested=float("inf"),
        )
    if privacy.enabled:
        ledger = PrivacyLedger(settings.state_dir)
        if privacy.noise_multiplier > 0:
            z = privacy.noise_multiplier
        else:
            z = ledger.plan_noise(
                site.dataset_id,
                run=run_id,
                sample_rate=plan.sample_rate,
                steps_per_round=plan.steps,
                rounds=num_rounds,
                target_epsilon=privacy.target_epsilon,
                budget_epsilon=settings.budget_epsilon,
                delta=settings.delta,
                accountant=privacy.accountant,
            ).noise_multiplier
        epsilon_spent = ledger.charge(
            site.dataset_id,
            run=run_id,
            round=server_round,
            segment=Segment(sample_rate=plan.sample_rate, noise_multiplier=z, steps=plan.steps),
            clip_norm=privacy.clip_norm,
            delta=settings.delta,
            budget_epsilon=settings.budget_epsilon,
            accountant=privacy.accountant,
        )
        dp = DPSettings(noise_multiplier=z, clip_norm=privacy.clip_norm)
    result = train_local(
        model, dataset, train=run.train, plan=plan, dp=dp, seed=seed if settings.simulated else None, learning_rate=run.learning_rate
    )
    logger.info(
        "%s round %d: %d steps at q=%.3f, loss %.4f, epsilon %.3f/%g",
        settings.name, server_round, plan.steps, plan.sample_rate, result.loss, epsilon_spent, settings.budget_epsilon,
    )
    return {
        "num-examples": n,
        "train-loss": result.loss,
        "dp": int(privacy.enabled),
        "epsilon": epsilon_spent,
        "budget-epsilon": settings.budget_epsilon if privacy.enabled else 0.0,
        "delta": settings.delta if privacy.enabled else 0.0,
        "noise-multiplier": dp.noise_multiplier if dp else 0.0,
        "clip-norm": dp.clip_norm if dp else 0.0,
        "sample-rate": plan.sample_rate,
        "steps": plan.steps,
        "clipped-fraction": result.clipped_fraction,
        "train-seconds": result.seconds,
    }
