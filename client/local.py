"""One round at a site: find its data, check and charge the privacy budget, train, report.

Order matters for privacy: the site's policy, the budget check and the ledger charge all come
before any training, so a refused round trains nothing and a crash mid-round still counts as spent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch.utils.data import TensorDataset

from fedtune.common.accounting import Segment
from fedtune.common.config import RunConfig
from fedtune.common.data import check_labels, record_digests
from fedtune.common.errors import ConfigError, DataError, LabelsMismatchError, PolicyRefusal
from fedtune.common.lm_site import EncodedSite
from fedtune.common.messages import PrivacyParams, RefusalCode, round_significant
from fedtune.common.sitedata import SiteExamples, load_config_table, simulated_split, site_examples
from fedtune.common.tasks import task_loss

from .deid import DeidSettings
from .ledger import PrivacyLedger
from .site import SiteSettings, resolve_site
from .train import DPSettings, StepPlan, TrainResult, train_local

if TYPE_CHECKING:
    from fedtune.common.causal_lm import LMTable
    from fedtune.common.lm_site import LMSplit

logger = logging.getLogger(__name__)

VALIDATION_SEED_FILE = "validation-seed"


@dataclass(frozen=True)
class PreparedSite:
    settings: SiteSettings
    examples: SiteExamples
    # Digests of the rows (common.data.record_digests): the ledger accounts every record's spend
    # under its digest, so editing or adding rows never gives the others a fresh budget.
    train_records: list[str]
    val_records: list[str]
    # causal-lm: the encoded examples (``examples`` is then empty), records keyed by the rows kept.
    lm: EncodedSite | None = None

    @property
    def all_records(self) -> list[str]:
        return [*self.train_records, *self.val_records]

    @property
    def train_size(self) -> int:
        """Training examples: a causal LM's kept after encoding (what DP-SGD samples from)."""
        return self.lm.train.examples if self.lm is not None else len(self.examples.train_texts)


def validation_seed(state_dir: Path) -> int:
    """The site's own secret seed for its validation split, drawn once and kept in its state folder.

    The run's seed never picks a deployed site's validation rows: a coordinator that could would
    choose which records each evaluation touches.
    """
    path = state_dir / VALIDATION_SEED_FILE
    if not path.exists():
        import secrets

        from fedtune.common.io import write_file_exclusive

        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            write_file_exclusive(path, str(secrets.randbits(62)).encode(), mode=0o600, overwrite=False)
        except ConfigError:  # another process drew it first: use theirs
            pass
    return int(path.read_text().strip())


def check_delta(delta: float, n: int, *, site: str) -> None:
    """delta must be far below 1/n: a mechanism that reveals one random record outright is (0, 1/n)-DP."""
    if n and delta >= 1.0 / n:
        raise ConfigError(f"site {site}: delta {delta:g} is not below 1/n = {1.0 / n:.3g} for its {n} records; "
                          "set [privacy] delta in site.toml well below it (e.g. 1/(10 n) or less).")
    if n and delta > 1.0 / (10 * n):
        logger.warning("site %s: delta %g is above 1/(10 n) = %.3g; a smaller delta is advisable", site, delta, 1.0 / (10 * n))


def _check_val_fraction(run: RunConfig, settings: SiteSettings) -> None:
    if run.data.val_fraction < settings.val_fraction:
        # A tiny validation split turns each evaluation into a query on a few records.
        raise PolicyRefusal(RefusalCode.VAL_FRACTION, f"data.val_fraction is {run.data.val_fraction:g}; this site validates "
                            f"on its own split of {settings.val_fraction:g} ([data] val_fraction) and refuses smaller ones.")


def prepare_site(run: RunConfig, node_config: Mapping[str, Any], *, run_dir: str, labels: list[str], tokenizer: Any = None) -> PreparedSite:
    """The site's examples for ``run``: its split, and the ledger's key of each record.

    A causal-LM run (``tokenizer``: the site's base model's) encodes them here, so that the
    records and the sampling rate count the examples kept (``common/lm_site.py``); labels do not
    apply to it.
    """
    settings = resolve_site(node_config, run, run_dir=run_dir)
    if run.causal_lm:
        return _prepare_lm_site(run, settings, tokenizer, node_config)
    table = load_config_table(settings.data)  # cached per process (a warm worker reads its file once)
    if settings.simulated:
        split = simulated_split(table, settings.data, num_sites=settings.num_partitions or run.federation.sites, seed=run.seed)
        if settings.partition is None or settings.partition >= len(split.sites):
            raise ConfigError(f"partition-id {settings.partition} is outside the {len(split.sites)} simulated sites.")
        indices = split.sites[settings.partition]
        seed = run.seed + settings.partition
    else:
        _check_val_fraction(run, settings)
        if settings.labels:
            # Compared with the site's published set: the answer carries nothing of its data.
            missing = sorted(set(settings.labels) - set(labels))
            if missing:
                raise LabelsMismatchError(f"the run's labels {labels} lack this site's published labels {missing}.")
            try:
                check_labels(table, list(settings.labels))
            except LabelsMismatchError as err:  # the site's own inconsistency (`site check` reports it), not the run's
                raise DataError(f"this site's data does not match its published labels ([data] labels): {err}") from None
        else:
            check_labels(table, labels)
        indices = list(range(len(table.labels)))
        seed = validation_seed(settings.state_dir)
        check_delta(settings.delta, len(indices), site=settings.name)
    examples = site_examples(table, indices, val_fraction=settings.val_fraction, seed=seed)
    if settings.simulated and run.data.canaries and settings.partition == run.data.canary_site:
        examples = _with_canaries(examples, run, labels)
    return PreparedSite(
        settings=settings, examples=_deidentified(examples, _site_deid(run, settings, node_config), site=settings.name),
        # The ledger keys the rows as stored, not as redacted: switching de-identification on or off
        # (or a redaction that makes two rows equal) never gives a row a fresh budget.
        train_records=record_digests(examples.train_texts, examples.train_labels),
        val_records=record_digests(examples.val_texts, examples.val_labels),
    )


def _site_deid(run: RunConfig, settings: SiteSettings, node_config: Mapping[str, Any]) -> DeidSettings:
    from .deid import site_deid

    return site_deid(node_config, simulated=settings.simulated, run_deidentify=run.data.deidentify)


def _deidentified(examples: SiteExamples, deid: DeidSettings, *, site: str) -> SiteExamples:
    """The site's texts with identifiers redacted (``client/deid.py``), before anything encodes them."""
    if not deid.enabled:
        return examples
    import dataclasses

    from .deid import deidentify

    train = deidentify(examples.train_texts, deid)
    val = deidentify(examples.val_texts, deid)
    _log_deid(site, len(examples.train_texts) + len(examples.val_texts), train.rows_changed + val.rows_changed,
              {e: train.counts[e] + val.counts[e] for e in train.counts})
    return dataclasses.replace(examples, train_texts=train.texts, val_texts=val.texts)


def _log_deid(site: str, rows: int, changed: int, counts: Mapping[str, int]) -> None:
    # Counts only, in the site's own log: they never go on the wire (common/messages.py has no field for them).
    logger.info("%s: de-identified %d of %d rows before training; redacted %s", site, changed, rows,
                ", ".join(f"{e} {n}" for e, n in counts.items()))


def _with_canaries(examples: SiteExamples, run: RunConfig, labels: list[str]) -> SiteExamples:
    """A privacy audit's canaries (``data.canaries``) join this simulated site's training rows, and only them.

    Added after the seeded split of the run's table, so a canary's presence changes the training
    set by that one row and moves no other: the neighbouring datasets the one-run audit's bound
    assumes (Steinke et al. 2023; ``fedtune/canary_audit.py``). Never in validation or test.
    """
    import dataclasses

    from fedtune.common.data import load_table

    canaries = load_table(run.data.canaries, text_column=run.data.text_column, label_column=run.data.label_column)
    check_labels(canaries, labels)
    return dataclasses.replace(examples, train_texts=[*examples.train_texts, *canaries.texts],
                               train_labels=[*examples.train_labels, *canaries.labels])


def _prepare_lm_site(run: RunConfig, settings: SiteSettings, tokenizer: Any, node_config: Mapping[str, Any]) -> PreparedSite:
    from fedtune.common.lm_site import load_config_lm_table, simulated_lm_split

    if tokenizer is None:
        raise ConfigError("a causal-lm site needs its base model's tokenizer to encode its examples; none was given.")
    table = load_config_lm_table(settings.data)
    if settings.simulated:
        split = simulated_lm_split(table, settings.data, num_sites=settings.num_partitions or run.federation.sites, seed=run.seed)
        if settings.partition is None or settings.partition >= len(split.sites):
            raise ConfigError(f"partition-id {settings.partition} is outside the {len(split.sites)} simulated sites.")
        indices, seed = split.sites[settings.partition], run.seed + settings.partition
    else:
        _check_val_fraction(run, settings)
        indices, seed = list(range(len(table))), validation_seed(settings.state_dir)
        check_delta(settings.delta, len(indices), site=settings.name)
    return prepare_lm_rows(run, settings, table, indices, seed=seed, tokenizer=tokenizer, deid=_site_deid(run, settings, node_config))


def prepare_lm_rows(run: RunConfig, settings: SiteSettings, table: LMTable, indices: Sequence[int], *, seed: int,
                 tokenizer: Any, deid: DeidSettings | None = None) -> PreparedSite:
    """A causal-LM site holding the rows ``indices`` of ``table``: its train/validation split (drawn with
    ``seed``), de-identified (``deid``; None: ``deid.site_deid`` with no node_config), encoded with
    ``tokenizer``, each kept row's ledger key. ``prepare_site``'s last step; a benchmark that
    partitions the rows its own way (by topic) calls it with its own ``indices``."""
    from fedtune.common.lm_site import encode_site, lm_site_split

    lm_split = lm_site_split(table, indices, val_fraction=settings.val_fraction, seed=seed, site=settings.name)
    deid = deid if deid is not None else _site_deid(run, settings, {})  # no node_config: a deployed site's [deid] is off
    encoded = encode_site(tokenizer, _deidentified_lm(lm_split, deid, site=settings.name), max_length=run.max_length,
                          template=run.data.template, site=settings.name)
    if deid.enabled:  # the ledger keys the rows as stored (see prepare_site)
        import dataclasses

        from fedtune.common.lm_site import kept_digests

        encoded = dataclasses.replace(encoded, train_records=kept_digests(lm_split.train, encoded.train),
                                      val_records=kept_digests(lm_split.val, encoded.val) if encoded.val else [])
    return PreparedSite(settings=settings, examples=SiteExamples(train_texts=[], train_labels=[], val_texts=[], val_labels=[]),
                        train_records=encoded.train_records, val_records=encoded.val_records, lm=encoded)


def _deidentified_lm(split: LMSplit, deid: DeidSettings, *, site: str) -> LMSplit:
    """Every message of a causal-LM site's rows with identifiers redacted, before encoding."""
    if not deid.enabled:
        return split
    from fedtune.common.lm_site import LMSplit

    from .deid import deidentify_lm

    train, train_result = deidentify_lm(split.train, deid)
    val, val_result = deidentify_lm(split.val, deid)
    _log_deid(site, len(split.train) + len(split.val), train_result.rows_changed + val_result.rows_changed,
              {e: train_result.counts[e] + val_result.counts[e] for e in train_result.counts})
    return LMSplit(train=train, val=val)


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
    proximal_reference: Mapping[str, torch.Tensor] | None = None,
) -> tuple[PrivacyParams, TrainResult]:
    """Check the run against the site's policy and budget, charge the ledger, then train one round.

    A deployed site ignores ``seed`` and draws its sampling and noise from OS entropy
    (see ``train_local``); a simulated site uses it, so simulations are reproducible.
    ``proximal_reference`` is FedProx's w_g, the adapter received this round (``train_local``).
    """
    n = len(dataset)
    plan = StepPlan.for_dataset(n, run.train)
    privacy = run.privacy
    settings = site.settings
    policy = settings.policy
    policy.check_run(dp=privacy.enabled, target_epsilon=privacy.target_epsilon, clip_norm=run.clip_norm,
                     steps=plan.steps, sample_rate=plan.sample_rate)
    dp: DPSettings | None = None
    epsilon_spent = 0.0
    if privacy.enabled:
        ledger = PrivacyLedger(settings.state_dir)
        if privacy.noise_multiplier > 0:
            z = privacy.noise_multiplier
        else:
            z = ledger.plan_noise(
                site.train_records,
                run=run_id,
                sample_rate=plan.sample_rate,
                steps_per_round=plan.steps,
                rounds=num_rounds,
                target_epsilon=privacy.target_epsilon,
                budget_epsilon=settings.budget_epsilon,
                delta=settings.delta,
                accountant=privacy.accountant,
                # Re-plans the rounds left when this run already charged more than its plan covers
                # (a round redone after the coordinator resumed), so the run still ends within its goal.
                server_round=server_round,
            ).noise_multiplier
        policy.check_noise(z)
        epsilon_spent = ledger.charge(
            site.train_records,
            run=run_id,
            round=server_round,
            segment=Segment(sample_rate=plan.sample_rate, noise_multiplier=z, steps=plan.steps),
            clip_norm=run.clip_norm,
            delta=settings.delta,
            budget_epsilon=settings.budget_epsilon,
            accountant=privacy.accountant,
        )
        dp = DPSettings(noise_multiplier=z, clip_norm=run.clip_norm)
        # The site's guarantee is the max over all its records: a row that is both in the training
        # and the validation split (a duplicate) carries both kinds of charge.
        epsilon_spent = max(epsilon_spent, ledger.spent_epsilon(site.all_records, delta=settings.delta))
    result = train_local(
        model, dataset, train=run.train, plan=plan, dp=dp, seed=seed if settings.simulated else None, learning_rate=run.learning_rate,
        proximal_reference=proximal_reference, loss_fn=task_loss(run.task),
    )
    logger.info(
        "%s round %d: %d steps at q=%.3f, loss %.4f, epsilon %.3f/%g",
        settings.name, server_round, plan.steps, plan.sample_rate, result.loss, epsilon_spent, settings.budget_epsilon,
    )
    params = PrivacyParams(
        dp=privacy.enabled,
        epsilon=epsilon_spent,
        budget_epsilon=settings.budget_epsilon if privacy.enabled else 0.0,
        delta=settings.delta if privacy.enabled else 0.0,
        noise_multiplier=dp.noise_multiplier if dp else 0.0,
        clip_norm=dp.clip_norm if dp else 0.0,
        # q = B / n would give n away exactly: two significant digits leave the site.
        sample_rate=round_significant(plan.sample_rate),
        steps=plan.steps,
    )
    return params, result
