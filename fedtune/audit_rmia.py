"""RMIA, the offline membership-inference attack of Zarifzadeh, Liu, Chang and Shokri (2024).

"Low-Cost High-Power Membership Inference Attacks", ICML 2024, arXiv:2312.03262. The loss attack
(``fedtune/audit.py``) asks "is x's loss low?"; RMIA asks "is x's probability *raised by this
model more than z's is*", for population samples z, which cancels how easy x is in itself:

    Pr(x)       = what x's probability is under models that did not see it, from reference models
    LR(x, z)    = (Pr(x | theta) / Pr(x)) / (Pr(z | theta) / Pr(z))        (the pairwise likelihood ratio)
    score(x)    = Pr_{z ~ population}[ LR(x, z) > gamma ]                 (the fraction of z x dominates)

with Pr(x | theta) the target model's softmax probability of x's true label. The *offline* variant
is what a site or an auditor can afford: the K reference models were trained like the target on data
of the same distribution that excludes every audited x and every z (all of them OUT), and Pr(x),
the mean over IN and OUT models, is approximated from the OUT mean alone by assuming
Pr_IN(x) = a * Pr_OUT(x) + (1 - a):

    Pr(x) = ((1 + a) * mean_k Pr(x | theta_k) + (1 - a)) / 2,   the same for every z.

a = 1 trusts the OUT models as they are; a = 0 assumes a member's probability would be 1. The
paper tunes a on a pair of reference models (one attacks the other); the reference implementation
(privacytrustlab/ml_privacy_meter, ``modules/mia/attacks/rmia.py``) defaults to a = 0.3 and gamma = 1
and counts ``LR > gamma`` strictly, as here. With a fixed, score(x) only grows with
Pr(x | theta) / Pr(x); gamma > 1 demands that x dominate z by that factor.

Pure numpy scoring of probability arrays; ``run_rmia_audit`` loads the models and files for
``fedtune audit --attack rmia`` and hands the scores to ``fedtune/audit.py``'s figures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.audit import DEFAULT_RESAMPLES, DEFAULT_SEED, AuditResult
from fedtune.common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_A = 0.3
DEFAULT_GAMMA = 1.0
ROC_FILE = "audit-rmia-roc.png"
_CHUNK = 1 << 22  # pairs (x, z) compared at once: bounds each block at ~32 MB of ratios (float64) and 4 MB of booleans
METHOD = (
    "RMIA, offline (Zarifzadeh et al. 2024): score(x) = fraction of {population} population samples z with "
    "(Pr(x|theta)/Pr(x)) / (Pr(z|theta)/Pr(z)) > gamma = {gamma:g}, Pr(.|theta) the target's probability of the true "
    "label, Pr(.) = ((1+a) * mean over {references} reference model(s) + (1-a)) / 2 with a = {a:g}; AUC is rank-based "
    "(Mann-Whitney U, ties count half), its {confidence:.0%} interval percentile bootstrap with {resamples} resamples, "
    "seed {seed}; TPR at a given FPR uses the best threshold that flags at most that fraction of non-members (Carlini "
    "et al. 2022), with exact Clopper-Pearson intervals, and is reported only with at least {min_fp} / FPR non-members."
)


@dataclass(frozen=True, kw_only=True)
class RmiaSettings:
    """RMIA's two parameters.

    Attributes:
        a: The offline correction, in [0, 1]: Pr_IN(x) is taken as a * Pr_OUT(x) + (1 - a).
        gamma: The likelihood-ratio threshold, > 0: x beats z when LR(x, z) > gamma.
    """

    a: float = DEFAULT_A
    gamma: float = DEFAULT_GAMMA

    def __post_init__(self) -> None:
        problems = []
        if not (0.0 <= self.a <= 1.0):  # also refuses NaN
            problems.append(f"--rmia-a must be in [0, 1] (1: use the reference models' mean as is), got {self.a}.")
        if not (self.gamma > 0.0 and math.isfinite(self.gamma)):
            problems.append(f"--rmia-gamma must be a finite number > 0 (1: the paper's reference code), got {self.gamma}.")
        if problems:
            raise ConfigError(" ".join(problems))


@dataclass(frozen=True)
class RmiaScores:
    """Per-example RMIA scores and what they were computed from.

    Attributes:
        scores: score(x) for each audited x, in [0, 1], shape (n,).
        ratios: Pr(x | theta) / Pr(x) for each x, shape (n,).
        population_ratios: Pr(z | theta) / Pr(z) for each z, shape (m,).
        references: K, the reference models averaged.
        settings: The a and gamma used.
    """

    scores: np.ndarray
    ratios: np.ndarray
    population_ratios: np.ndarray
    references: int
    settings: RmiaSettings


def _probabilities(values: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != ndim:
        shape = "(n,)" if ndim == 1 else "(K references, n)"
        raise DataError(f"{name} must have shape {shape}, got shape {arr.shape}.")
    if arr.size == 0:
        raise DataError(f"{name} is empty, shape {arr.shape}; RMIA needs at least one example and one reference model.")
    bad = ~(np.isfinite(arr) & (arr > 0.0) & (arr <= 1.0))
    if bad.any():
        first = arr[bad].ravel()[0]
        raise DataError(f"{name} holds {int(bad.sum())} value(s) outside (0, 1] (e.g. {first}); each must be a model's "
                        "probability of the true label, exp(-cross-entropy loss).")
    return arr


def marginal_probability(reference_probs: Any, a: float, *, name: str = "reference probabilities") -> np.ndarray:
    """Pr(x) from K OUT reference models: ((1 + a) * mean_k Pr(x | theta_k) + (1 - a)) / 2, shape (n,).

    ``reference_probs`` has shape (K, n): row k is reference model k's probability of each example's label.
    """
    refs = _probabilities(reference_probs, name, 2)
    if not 0.0 <= a <= 1.0:
        raise ConfigError(f"--rmia-a must be in [0, 1], got {a}.")
    return ((1.0 + a) * refs.mean(axis=0) + (1.0 - a)) / 2.0


def rmia_scores(
    target: Any, references: Any, population_target: Any, population_references: Any, *, settings: RmiaSettings = RmiaSettings(),
) -> RmiaScores:
    """RMIA's score of each audited x against the population z (module docstring).

    Args:
        target: Pr(x | theta), the target's probability of each audited example's label, shape (n,).
        references: Pr(x | theta_k), shape (K, n), K >= 1 reference models that never trained on x.
        population_target: Pr(z | theta) for each population sample, shape (m,).
        population_references: Pr(z | theta_k), shape (K, m), the same K models in the same order.
        settings: a and gamma.

    Raises:
        DataError: a wrong shape, an empty array, a K that differs between x and z, or a value that
            is not a probability in (0, 1] (NaN included).
    """
    px = _probabilities(target, "target probabilities of the audited examples", 1)
    refs_x = _probabilities(references, "reference probabilities of the audited examples", 2)
    pz = _probabilities(population_target, "target probabilities of the population", 1)
    refs_z = _probabilities(population_references, "reference probabilities of the population", 2)
    if refs_x.shape != (refs_x.shape[0], px.size):
        raise DataError(f"reference probabilities of the audited examples have shape {refs_x.shape}; expected "
                        f"(K, {px.size}), one column per audited example.")
    if refs_z.shape != (refs_x.shape[0], pz.size):
        raise DataError(f"reference probabilities of the population have shape {refs_z.shape}; expected "
                        f"({refs_x.shape[0]}, {pz.size}): the same {refs_x.shape[0]} reference model(s), one column per sample.")
    ratio_x = px / marginal_probability(refs_x, settings.a)
    ratio_z = pz / marginal_probability(refs_z, settings.a)
    # LR(x, z) > gamma over every pair, by the definition (no sorting trick whose rounding could flip a tie).
    counts = np.empty(px.size, dtype=np.int64)
    rows = max(1, _CHUNK // ratio_z.size)
    for start in range(0, px.size, rows):
        block = ratio_x[start:start + rows, None] / ratio_z[None, :]
        counts[start:start + rows] = np.count_nonzero(block > settings.gamma, axis=1)
    return RmiaScores(scores=counts / ratio_z.size, ratios=ratio_x, population_ratios=ratio_z,
                      references=int(refs_x.shape[0]), settings=settings)


# ------------------------------------------------------------------------------ the attack on a run
@dataclass(frozen=True)
class RmiaAudit:
    """``fedtune audit --attack rmia``: the audit's figures (``fedtune.audit.AuditResult``) and RMIA's inputs."""

    result: AuditResult  # attack "rmia"
    references: tuple[str, ...]
    population: int
    settings: RmiaSettings

    def to_json(self) -> dict[str, Any]:
        return {**self.result.to_json(), "rmia": {"a": self.settings.a, "gamma": self.settings.gamma,
                                                  "references": list(self.references), "population": self.population}}


def _adapter_meta(run: Path, flag: str) -> dict[str, Any]:
    from fedtune.common.io import read_json_object
    from fedtune.common.model import METADATA_FILE

    adapter = run / "adapter"
    if not adapter.is_dir():
        raise ConfigError(f"{flag} {run}: no adapter/ folder there; it must be a finished fedtune run directory.")
    meta = read_json_object(adapter / METADATA_FILE, f"{flag} {run}/adapter")
    if meta.get("task", "classification") != "classification" or "labels" not in meta:
        raise ConfigError(f"{flag} {run}: adapter/{METADATA_FILE} is not a classification adapter's (no labels); "
                          "RMIA needs each model's probability of the true label.")
    return meta


def check_references(run_dir: Path, references: Sequence[Path]) -> None:
    """Refuse references that cannot be compared with the target: none, the target itself, a repeat,
    another label set or another base model (``base_model_id``, else ``base_model``).

    Raises:
        ConfigError: naming ``--reference``, the value and what is allowed.
    """
    if not references:
        raise ConfigError("--attack rmia needs at least one --reference REF_RUN_DIR (a finished run trained like the target on "
                          "other data of the same distribution, none of the audited rows); got none.")
    target = _adapter_meta(Path(run_dir), "RUN_DIR")
    seen: set[Path] = set()
    for ref in references:
        ref = Path(ref)
        if ref.resolve() == Path(run_dir).resolve():
            raise ConfigError(f"--reference {ref} is the audited run itself; a reference model must not have trained on the audited rows.")
        if ref.resolve() in seen:
            raise ConfigError(f"--reference {ref} is given twice; each reference run counts once in Pr(x).")
        seen.add(ref.resolve())
        meta = _adapter_meta(ref, "--reference")
        if sorted(map(str, meta["labels"])) != sorted(map(str, target["labels"])):
            raise ConfigError(f"--reference {ref} has labels {list(meta['labels'])}; the audited run has {list(target['labels'])}. "
                              "A reference must be trained on the same label set.")
        key = "base_model_id" if "base_model_id" in meta and "base_model_id" in target else "base_model"
        if str(meta.get(key)) != str(target.get(key)):
            raise ConfigError(f"--reference {ref} was trained on base model {meta.get('base_model')} ({key} {meta.get(key)}); "
                              f"the audited run on {target.get('base_model')} ({key} {target.get(key)}). A reference must "
                              "fine-tune the same base model.")


def _true_label_probabilities(loaded: Any, sides: dict[str, tuple[list[str], list[str]]]) -> dict[str, np.ndarray]:
    """exp(-cross-entropy) = softmax probability of the true label, per example, for each set."""
    from fedtune.common.tasks import encode, score_examples

    out = {}
    for flag, (texts, labels) in sides.items():
        dataset = encode(loaded.tokenizer, texts, labels, loaded.labels, max_length=loaded.max_length)
        out[flag] = np.exp(-score_examples(loaded.model, dataset).losses)
    return out


def run_rmia_audit(
    run_dir: Path,
    *,
    members: Path,
    non_members: Path,
    references: Sequence[Path],
    population: Path | None,
    settings: RmiaSettings = RmiaSettings(),
    text_column: str = "text",
    label_column: str = "label",
    max_examples: int | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    base_model: str | None = None,
    roc_png: Path | None = None,
) -> RmiaAudit:
    """Score RUN_DIR/adapter and each reference run's adapter on the members, non-members and population
    (each model loaded once), then RMIA's score of every member and non-member.

    Raises:
        ConfigError: no reference, no population, a reference unlike the target (``check_references``),
            a missing adapter/ folder, a bad ``max_examples``.
        DataError: a missing or empty data file, a label outside the run's label set, or population rows
            that are also members or non-members (the counts are named), each named with its flag.
    """
    # The loss attack's own file handling and figures: the two attacks read the same files the same way.
    from fedtune.audit import DEFAULT_CONFIDENCE, _flagged, _subsample, scored_result
    from fedtune.audit_stats import MIN_FALSE_POSITIVES
    from fedtune.common.data import check_labels, load_table

    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"--max-examples must be >= 1, got {max_examples}.")
    check_references(Path(run_dir), references)
    if population is None:
        raise ConfigError("--attack rmia needs --population FILE: labeled rows of the same distribution that neither the "
                          "audited run nor any reference trained on, disjoint from --members and --non-members.")
    paths = {"--members": Path(members), "--non-members": Path(non_members), "--population": Path(population)}
    tables = {flag: _flagged(flag, lambda p=path: load_table(p, text_column=text_column, label_column=label_column))
              for flag, path in paths.items()}
    sides = {flag: _subsample(table, max_examples, seed) for flag, table in tables.items()}
    rows = {flag: set(zip(*side)) for flag, side in sides.items()}
    # Against the whole files, not their --max-examples samples: a member left out of the audited
    # sample was still trained on, and as a population row it would raise Pr(z|theta) all the same.
    whole = {flag: set(zip(tables[flag].texts, tables[flag].labels)) for flag in ("--members", "--non-members")}
    in_m, in_n = len(rows["--population"] & whole["--members"]), len(rows["--population"] & whole["--non-members"])
    if in_m or in_n:
        # A population row the target trained on raises Pr(z|theta) and hides real members; refuse rather than guess.
        raise DataError(f"--population {population}: {in_m} distinct (text, label) rows are also in --members and {in_n} in "
                        "--non-members; the population must be disjoint from both (drop those rows).")
    overlap = len(rows["--members"] & rows["--non-members"])
    if overlap:
        logger.warning("%d distinct (text, label) rows appear in both --members and --non-members.", overlap)

    from fedtune.inference import load_adapter  # torch: only once the data is known good

    def load(run: Path, flag: str) -> Any:
        try:
            loaded = load_adapter(Path(run) / "adapter", base_model=base_model)
        except ConfigError as err:
            raise ConfigError(f"{flag} {run}: {err}") from None
        for side_flag, table in tables.items():
            _flagged(side_flag, lambda t=table: check_labels(t, loaded.labels))
        return loaded

    target = load(Path(run_dir), "RUN_DIR")
    probs = _true_label_probabilities(target, sides)
    del target  # one model in memory at a time
    ref_probs: dict[str, list[np.ndarray]] = {flag: [] for flag in sides}
    for ref in references:
        loaded = load(Path(ref), "--reference")
        for flag, values in _true_label_probabilities(loaded, sides).items():
            ref_probs[flag].append(values)
        del loaded
    n_m = len(sides["--members"][0])
    scored = rmia_scores(
        np.concatenate([probs["--members"], probs["--non-members"]]),
        np.concatenate([np.stack(ref_probs["--members"]), np.stack(ref_probs["--non-members"])], axis=1),
        probs["--population"], np.stack(ref_probs["--population"]), settings=settings,
    )
    pos, neg = scored.scores[:n_m], scored.scores[n_m:]
    logger.info("audit (rmia): %d members, %d non-members, %d population, %d references", pos.size, neg.size,
                probs["--population"].size, len(references))
    result = scored_result(
        pos, neg, resamples=resamples, seed=seed, overlap=overlap, roc_png=roc_png, attack="rmia",
        roc_title="RMIA membership inference (offline)",
        method=METHOD.format(population=probs["--population"].size, gamma=settings.gamma, references=len(references),
                             a=settings.a, confidence=DEFAULT_CONFIDENCE, resamples=resamples, seed=seed, min_fp=MIN_FALSE_POSITIVES),
        mean_losses=(float(np.mean(-np.log(probs["--members"]))), float(np.mean(-np.log(probs["--non-members"])))),
    )
    return RmiaAudit(result=result, references=tuple(str(r) for r in references), population=int(probs["--population"].size),
                     settings=settings)
