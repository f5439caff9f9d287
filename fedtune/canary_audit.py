"""One-run canary audit: an empirical lower bound on epsilon from a single federated training run.

Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run" (NeurIPS,
arXiv:2305.08846). m canaries are drawn i.i.d. (random lowercase "words" with a label drawn
uniformly from the run's label set: out-of-distribution texts with random labels, so only
memorisation can fit them); each is included, independently with probability 1/2, in the training
rows of one simulated site (``data.canaries`` / ``data.canary_site``, added after the seeded split of
the run's table so a canary's presence moves no other record). The run is an ordinary
``fedtune simulate`` run (Flower's simulation engine, Opacus DP-SGD at each site). Afterwards each
canary gets a score, the top-k are guessed "in" and the bottom-k "out", and
``fedtune.audit_stats.one_run_audit`` turns the correct guesses into the largest epsilon the run
cannot have at 95% confidence (Bonferroni over the k tried).

Scores (higher = more likely included):

- black-box: minus the cross-entropy loss of the final adapter (``RUN_DIR/adapter``) on the canary;
- white-box: sum over rounds t of <theta_t - theta_{t-1}, -g_i / ||g_i||>, g_i the gradient of the
  canary's loss at theta_t (the round's result, which the coordinator holds too; at theta_{t-1} the
  bound of the non-DP control was 0.54 against 1.30 at theta_t, with 20 local epochs a round: the
  start's gradient of a canary not yet fitted points less along what fitting it moved) with respect
  to the exchanged adapter tensors, theta_t the global
  adapter after round t (``RUN_DIR/checkpoints/round-t``; theta_0 the initial adapter every process
  derives from the seed). Those are what the coordinator publishes, a function of the per-site
  updates it receives; with ``--sites 1`` and FedAvg (no server optimiser, no client-level DP) theta_t
  - theta_{t-1} *is* the canary site's update as the coordinator sees it in its message. Per-site
  updates of a run with more sites are not kept by fedtune, so they are not audited here.

Reading the figures. A DP run's lower bound must stay below its epsilon (the canary site's, from
``summary.json``); a bound above it means a bug in the accounting, the sampling, the noise or this
audit, and ``check_bound`` raises. A non-DP run should show a large bound (the positive control).
A bound far below epsilon is expected for DP-SGD audited in one run with these attacks; it is a
lower bound on leakage, never a proof of privacy.

Caveats of the neighbouring relation: the canary site's sampling rate q = B / n and its calibrated
noise z depend on its row count n, so on how many canaries are in (by about B / n^2 per canary);
fedtune's accountant, like Opacus', treats q as public.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.audit_stats import DEFAULT_CONFIDENCE, OneRunAudit, one_run_audit
from fedtune.common.errors import ConfigError, FedtuneError

if TYPE_CHECKING:
    from fedtune.common.config import RunConfig

logger = logging.getLogger(__name__)

DEFAULT_CANARIES = 1000
CANARY_DIR = "canaries"
KEY_FILE = "key.csv"  # every canary, with its inclusion bit: the audit's secret
IN_FILE = "in.csv"  # the included ones, the rows the canary site trains on
RESULT_FILE = "canary-audit.json"
_GRAD_BATCH = 32
_WORDS, _LETTERS = 8, "abcdefghijklmnopqrstuvwxyz"
WHITE_BOX_SOURCE = (
    "per-round global adapter updates theta_t - theta_{t-1} (RUN_DIR/checkpoints/round-t), projected on each canary's "
    "unit loss gradient at theta_t; exactly the canary site's update as the coordinator receives it when the run has "
    "one site and plain FedAvg"
)


class AuditBoundExceeded(FedtuneError):
    """An empirical lower bound above the run's own epsilon: the guarantee, or the audit, is broken."""

    code = "audit-bound-exceeded"


@dataclass(frozen=True)
class Canary:
    text: str
    label: str
    included: bool


def make_canaries(m: int, labels: list[str], *, seed: int) -> list[Canary]:
    """m i.i.d. canaries: 8 random lowercase words of 3 to 8 letters, a uniform label, inclusion Bernoulli(1/2).

    Every canary comes from the same distribution and its inclusion bit is drawn independently of
    its text and label, so included and excluded canaries are exchangeable (the theorem's premise).
    """
    if m < 2:
        raise ConfigError(f"--canaries must be >= 2, got {m}.")
    if len(labels) < 2:
        raise ConfigError(f"canaries need the run's label set of at least 2 labels, got {labels}.")
    rng = np.random.default_rng([int(seed), 0xCA7A])
    out = []
    for _ in range(m):
        words = ["".join(rng.choice(list(_LETTERS), size=int(rng.integers(3, 9)))) for _ in range(_WORDS)]
        out.append(Canary(text=" ".join(words), label=labels[int(rng.integers(len(labels)))], included=bool(rng.random() < 0.5)))
    return out


def write_canaries(folder: Path, canaries: list[Canary], *, text_column: str = "text", label_column: str = "label") -> Path:
    """Write the key (every canary and its bit) and the included rows; returns the included rows' file."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / KEY_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "included"])
        writer.writerows((c.text, c.label, int(c.included)) for c in canaries)
    with open(folder / IN_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([text_column, label_column])
        writer.writerows((c.text, c.label) for c in canaries if c.included)
    return folder / IN_FILE


def read_canaries(run_dir: Path) -> list[Canary]:
    path = Path(run_dir) / CANARY_DIR / KEY_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; RUN_DIR must be a run made by `fedtune audit-canary`.")
    with open(path, newline="", encoding="utf-8") as f:
        return [Canary(text=r["text"], label=r["label"], included=r["included"] == "1") for r in csv.DictReader(f)]


def canary_run_config(run: RunConfig, *, canaries: int = DEFAULT_CANARIES, canary_site: int = 0, seed: int | None = None) -> RunConfig:
    """Draw the canaries, write them into ``run.out``/canaries/, and return ``run`` training them at ``canary_site``."""
    from fedtune.common.config import from_dict
    from fedtune.common.sitedata import load_config_table, run_labels

    if not run.out:
        raise ConfigError("the canary audit needs the run directory (out) before the run starts.")
    if run.causal_lm:
        raise ConfigError("the canary audit scores a classifier's loss; task = 'causal-lm' is not supported.")
    labels = run_labels(run.data, load_config_table(run.data))
    drawn = make_canaries(canaries, labels, seed=run.seed if seed is None else seed)
    path = write_canaries(Path(run.out) / CANARY_DIR, drawn, text_column=run.data.text_column, label_column=run.data.label_column)
    if not any(c.included for c in drawn):  # probability 2^-m; the site then trains on its own rows only
        return from_dict({"data": {"canaries": "", "canary_site": canary_site}}, base=run)
    return from_dict({"data": {"canaries": str(path.resolve()), "canary_site": canary_site}}, base=run)


# ------------------------------------------------------------------------------------------ scores
def black_box_scores(run_dir: Path, canaries: list[Canary]) -> np.ndarray:
    """Minus each canary's loss under the final adapter, loaded the plain PEFT way."""
    from fedtune.audit import per_example_losses
    from fedtune.common.tasks import encode
    from fedtune.inference import load_adapter

    loaded = load_adapter(Path(run_dir) / "adapter")
    dataset = encode(loaded.tokenizer, [c.text for c in canaries], [c.label for c in canaries], loaded.labels,
                     max_length=loaded.max_length)
    return -per_example_losses(loaded.model, dataset)


def white_box_scores(run_dir: Path, canaries: list[Canary]) -> np.ndarray:
    """Sum over rounds of the global update projected on each canary's unit loss gradient (see the module docstring)."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from fedtune.common.config import load_toml
    from fedtune.common.model import ADAPTER_NAME, adapter_state, build_run_model, load_adapter_state, load_tokenizer
    from fedtune.common.tasks import encode, forward_loss

    run_dir = Path(run_dir)
    run = load_toml(run_dir / "config.toml")
    labels = list(json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["labels"])
    model = build_run_model(run, len(labels)).model
    previous = adapter_state(model)  # theta_0: what the coordinator sends in round 1, derived from the seed
    names = list(previous)
    # The exchanged tensors are views of parameters; match them by storage to get each one's gradient.
    by_ptr = {p.data_ptr(): p for p in model.parameters()}
    params = [by_ptr[t.data_ptr()] for k, t in sorted(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()) if k in previous]
    if len(params) != len(names):
        raise ConfigError(f"{run_dir}: {len(names)} exchanged tensors but {len(params)} matching parameters; cannot take gradients.")
    dataset = encode(load_tokenizer(run.model), [c.text for c in canaries], [c.label for c in canaries], labels, max_length=run.max_length)
    rounds = sorted(int(p.name.removeprefix("round-")) for p in (run_dir / "checkpoints").glob("round-*"))
    if not rounds:
        raise ConfigError(f"{run_dir}/checkpoints holds no round-N folder; the white-box audit needs the per-round adapters.")
    from opacus import GradSampleModule

    # Per-example gradients in one batched backward pass per batch, the way DP-SGD takes them
    # (client/train.py); hooks only, the parameters stay the model's.
    gs_model = GradSampleModule(model, loss_reduction="sum")
    # Evaluation mode, so no dropout (here or inside attention): the gradient at theta, not at a
    # random mask. Opacus records activations only of modules in training mode, so the modules
    # holding trainable tensors (LoRA's and the head's Linear layers, which act the same in both
    # modes) alone are switched back.
    gs_model.eval()
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()
    scores = np.zeros(len(canaries))
    for t in rounds:
        saved = load_file(str(run_dir / "checkpoints" / f"round-{t}" / "adapter_model.safetensors"))
        current = {k: saved[k].float() for k in names}
        update = [(current[k] - previous[k].float()).reshape(-1).double() for k in names]
        load_adapter_state(model, dict(current))  # the gradient at the round's result (module docstring)
        for start in range(0, len(dataset), _GRAD_BATCH):
            batch = [x[start : start + _GRAD_BATCH] for x in dataset.tensors]
            for param in params:
                param.grad, param.grad_sample = None, None
            loss, _ = forward_loss(gs_model, batch, reduction="sum")
            loss.backward()
            dot = torch.zeros(len(batch[0]), dtype=torch.float64)
            sq = torch.zeros(len(batch[0]), dtype=torch.float64)
            for param, u in zip(params, update):
                g = getattr(param, "grad_sample", None)
                if g is None:  # a tensor this batch's loss does not reach
                    continue
                g = -g.reshape(len(g), -1).double()  # descent direction of each canary's loss
                dot += g @ u
                sq += (g * g).sum(dim=1)
            norm = torch.sqrt(sq)
            scores[start : start + len(norm)] += torch.where(norm > 0, dot / norm.clamp_min(1e-30), 0.0).numpy()
        previous = current
    for param in params:
        param.grad, param.grad_sample = None, None
    return scores


# ------------------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class CanaryAuditResult:
    """Both audits of one canary run, beside the canary site's own guarantee.

    ``epsilon`` and ``delta`` are the canary site's (``summary.json``); ``epsilon`` is None for a
    run without DP. The bounds use ``delta`` (the run's privacy.delta when there is no DP).
    """

    run_dir: Path
    site: str
    dp: bool
    epsilon: float | None
    delta: float
    black_box: OneRunAudit
    white_box: OneRunAudit | None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "site": self.site, "dp": self.dp, "epsilon": self.epsilon, "delta": self.delta,
            "method": "one-run audit (Steinke, Nasr, Jagielski 2023); top-k guessed in, bottom-k out; Bonferroni over k",
            "black_box": {"score": "minus the final adapter's loss on the canary", **self.black_box.to_json()},
            "white_box": None if self.white_box is None else {"score": WHITE_BOX_SOURCE, **self.white_box.to_json()},
        }


def check_bound(result: CanaryAuditResult) -> None:
    """Raise AuditBoundExceeded if a DP run's empirical lower bound is above its epsilon.

    A correct run and audit exceed it with probability at most 1 - confidence (5%), and in
    practice far less (one-run audits of DP-SGD are loose); seeing it is a reason to stop and look.
    """
    if not result.dp or result.epsilon is None:
        return
    for name, audit in (("black-box", result.black_box), ("white-box", result.white_box)):
        if audit is not None and audit.epsilon_lower_bound > result.epsilon:
            raise AuditBoundExceeded(
                f"{name} empirical epsilon lower bound {audit.epsilon_lower_bound:.3f} (at {audit.confidence:.0%} confidence, "
                f"{audit.best.correct} of {audit.best.guesses} guesses right on {audit.canaries} canaries) exceeds "
                f"{result.site}'s epsilon {result.epsilon:.3f} at delta {result.delta:g}: the DP guarantee does not hold "
                f"for this run, or the audit is wrong. Results kept in {result.run_dir / RESULT_FILE}."
            )


def score_canary_run(run_dir: Path, *, white_box: bool = True, confidence: float = DEFAULT_CONFIDENCE) -> CanaryAuditResult:
    """Score the canaries of a finished canary run and compute both lower bounds; writes RUN_DIR/canary-audit.json.

    Does not raise on a bound above epsilon: call ``check_bound`` (after the figures are safe on disk).
    """
    from fedtune.common.config import load_toml
    from fedtune.common.io import atomic_write_json

    run_dir = Path(run_dir)
    canaries = read_canaries(run_dir)
    run = load_toml(run_dir / "config.toml")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    site = f"site-{run.data.canary_site}"
    record = next((s for s in summary.get("sites", []) if s.get("site") == site), None)
    dp = bool(summary.get("dp"))
    if dp and record is None:
        raise ConfigError(f"{run_dir}/summary.json has no entry for the canary site {site}; did it take part in the run?")
    epsilon = float(record["epsilon"]) if dp and record is not None else None
    delta = float(record["delta"]) if dp and record is not None else run.privacy.delta
    included = np.array([c.included for c in canaries])
    kw = {"delta": delta, "confidence": confidence}
    bb = one_run_audit(black_box_scores(run_dir, canaries), included, **kw)
    wb = one_run_audit(white_box_scores(run_dir, canaries), included, **kw) if white_box else None
    result = CanaryAuditResult(run_dir=run_dir, site=site, dp=dp, epsilon=epsilon, delta=delta, black_box=bb, white_box=wb)
    atomic_write_json(run_dir / RESULT_FILE, result.to_json())
    return result


def run_canary_audit(run: RunConfig, *, canaries: int = DEFAULT_CANARIES, canary_site: int = 0, white_box: bool = True,
                     confidence: float = DEFAULT_CONFIDENCE, check: bool = True) -> CanaryAuditResult:
    """Draw canaries, train once with ``fedtune simulate``'s code path, score, and (``check``) check the bound.

    Raises:
        AuditBoundExceeded: with ``check``, a DP run's lower bound above its epsilon (the figures are
            written to RUN_DIR/canary-audit.json first).
    """
    from fedtune.simulations.simulate import run_simulation

    run_dir = run_simulation(canary_run_config(run, canaries=canaries, canary_site=canary_site))  # preflight included
    result = score_canary_run(run_dir, white_box=white_box, confidence=confidence)
    if check:
        check_bound(result)
    return result


__all__ = [
    "AuditBoundExceeded", "Canary", "CanaryAuditResult", "DEFAULT_CANARIES", "canary_run_config", "check_bound",
    "make_canaries", "read_canaries", "run_canary_audit", "score_canary_run",
]
