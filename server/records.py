"""The run directory: per-round metrics, the summary, and the report plot.

```
RUN_DIR/
  config.toml              the resolved config
  metrics.jsonl            one JSON line per round
  run.json                 the run's identity (the ledger run id sites charge under), written before round 1
  checkpoints/round-N/     the global adapter after round N (PEFT format), the state a resume needs
                           (resume-state.json, server-opt.safetensors) and complete.json, written last
  adapter/                 the final global adapter (PEFT format)
  summary.json             the run's result, privacy per site
  report.png               accuracy and epsilon per round
```
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.common.errors import ConfigError
from fedtune.common.io import append_jsonl, atomic_write_bytes, atomic_write_json
from fedtune.common.messages import TrainReply, ValidationStats
from fedtune.common.metrics_file import METRICS_FILE, read_metrics_file  # noqa: F401 (re-exported: server code reads them here)

logger = logging.getLogger(__name__)


@dataclass
class SiteRecord:
    """What the coordinator knows of one site's privacy, from its replies (never averaged).

    ``examples`` is the site's FedAvg weight: its training examples to two significant digits.
    ``epsilon`` is the max over the site's records: those it trained on (``training_epsilon``)
    and those its released validation statistics were computed on (``statistics_epsilon``).
    """

    site: str
    examples: int = 0
    epsilon: float = 0.0
    training_epsilon: float = 0.0
    statistics_epsilon: float = 0.0
    statistics: str = "none"
    budget_epsilon: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    rounds: int = 0
    epsilon_by_round: dict[int, float] = field(default_factory=dict)

    def update(self, server_round: int, reply: TrainReply) -> None:
        p = reply.privacy
        self.examples = reply.weight
        self.training_epsilon = p.epsilon
        self.budget_epsilon = p.budget_epsilon
        self.delta = p.delta
        self.noise_multiplier = p.noise_multiplier
        self.clip_norm = p.clip_norm
        self.sample_rate = p.sample_rate
        self.steps += p.steps
        self.rounds += 1
        if reply.validation is not None:
            self.validated(reply.validation)
        if reply.training is not None:
            self.statistics = _mode(self.statistics, "clear")
        self.epsilon = max(self.training_epsilon, self.statistics_epsilon)
        self.epsilon_by_round[server_round] = self.epsilon

    def validated(self, stats: ValidationStats) -> None:
        """Record a validation release (its epsilon covers the site's validation records)."""
        self.statistics = _mode(self.statistics, stats.mode)
        self.statistics_epsilon = max(self.statistics_epsilon, stats.epsilon)
        self.epsilon = max(self.training_epsilon, self.statistics_epsilon)

    def to_state(self) -> dict[str, Any]:
        """Everything, for a checkpoint: the summary's fields and the epsilon of every round."""
        return {**self.to_json(), "epsilon_by_round": {str(k): v for k, v in sorted(self.epsilon_by_round.items())}}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> SiteRecord:
        """The inverse of :meth:`to_state`."""
        by_round = {int(k): float(v) for k, v in data.get("epsilon_by_round", {}).items()}
        return cls(**{**{k: v for k, v in data.items() if k != "epsilon_by_round"}, "epsilon_by_round": by_round})

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "examples": self.examples,
            "epsilon": self.epsilon,
            "training_epsilon": self.training_epsilon,
            "statistics_epsilon": self.statistics_epsilon,
            "statistics": self.statistics,
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "rounds": self.rounds,
        }


def _mode(current: str, new: str) -> str:
    """The least private statistics mode seen: clear > dp > none."""
    order = ("none", "dp", "clear")
    return max(current, new, key=order.index)


class RunRecorder:
    """Appends round lines and writes the summary and plot of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.rounds: list[dict[str, Any]] = []
        self.sites: dict[str, SiteRecord] = {}

    def site(self, name: str) -> SiteRecord:
        return self.sites.setdefault(name, SiteRecord(site=name))

    def add_round(self, line: dict[str, Any]) -> None:
        self.note_round(line)
        self.append_round(line)

    def note_round(self, line: dict[str, Any]) -> None:
        """Keep a round's line in memory only: the round loop checkpoints it before it reaches metrics.jsonl."""
        self.rounds.append(line)

    def append_round(self, line: dict[str, Any]) -> None:
        """Append a round's line to metrics.jsonl (fsynced)."""
        append_jsonl(self.run_dir / METRICS_FILE, line)

    def restore(self, rounds: list[dict[str, Any]], sites: dict[str, SiteRecord]) -> None:
        """Continue from a checkpoint: the round lines already in metrics.jsonl and each site's record."""
        self.rounds = list(rounds)
        self.sites = dict(sites)

    def write_summary(self, summary: dict[str, Any]) -> None:
        summary["sites"] = [s.to_json() for s in sorted(self.sites.values(), key=lambda s: s.site)]
        atomic_write_json(self.run_dir / "summary.json", summary)

    def plot(self, *, dp: bool, final_validation: dict[str, Any] | None = None, base_perplexity: float | None = None) -> Path | None:
        """Accuracy, or a causal LM's perplexity (and, under DP, epsilon per site) per round, to ``report.png``."""
        if not self.rounds:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(10, 4))
        for ax in (ax_acc, ax_eps):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # x = the round after which the adapter was measured (0: the initial adapter). Sites
        # validate the adapter they receive, so round r's line holds the adapter after round r-1.
        val = [(r["validated_round"], r["accuracy"]) for r in self.rounds if r.get("validated_round") is not None and r.get("accuracy") is not None]
        if final_validation and final_validation.get("accuracy") is not None:
            val.append((final_validation["round"], final_validation["accuracy"]))
        if val:
            ax_acc.plot([x for x, _ in val], [y for _, y in val], marker="o", label="site validation (weighted)")
        test = [(r["round"], r["test_accuracy"]) for r in self.rounds if r.get("test_accuracy") is not None]
        if test:
            ax_acc.plot([x for x, _ in test], [y for _, y in test], marker="o", label="held-out test")
        perplexity = [(r["round"], r["test_perplexity"]) for r in self.rounds if r.get("test_perplexity") is not None]
        if perplexity:  # a causal LM: no accuracy, a perplexity (lower is better), against the base model's
            ax_acc.plot([x for x, _ in perplexity], [y for _, y in perplexity], marker="o", label="held-out test")
            if base_perplexity is not None:
                ax_acc.axhline(base_perplexity, color="grey", linestyle="--", linewidth=1, label="base model")
            ax_acc.set(xlabel="after round", ylabel="perplexity", title="Global adapter perplexity")
        else:
            ax_acc.set(xlabel="after round", ylabel="accuracy", title="Global adapter accuracy")
        ax_acc.grid(alpha=0.3)
        if ax_acc.get_legend_handles_labels()[0]:
            ax_acc.legend()
        if dp:
            for site in sorted(self.sites.values(), key=lambda s: s.site):
                xs = sorted(site.epsilon_by_round)
                ax_eps.plot(xs, [site.epsilon_by_round[x] for x in xs], marker="o", label=site.site)
            budgets = {s.budget_epsilon for s in self.sites.values()}
            for b in budgets:
                ax_eps.axhline(b, color="grey", linestyle="--", linewidth=1)
            ax_eps.set(xlabel="round", ylabel="epsilon spent (cumulative)", title="Privacy spent per site")
            if self.sites:
                ax_eps.legend()
        else:
            ax_eps.text(0.5, 0.5, "trained WITHOUT differential privacy", ha="center", va="center", fontsize=12)
            ax_eps.set_axis_off()
        ax_eps.grid(alpha=0.3)
        fig.tight_layout()
        path = self.run_dir / "report.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
        return path



def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The round lines of ``run_dir``'s metrics.jsonl; a torn last line (a live run's append) is left out.

    Raises:
        ConfigError: another line is not a round's JSON line.
    """
    metrics = read_metrics_file(run_dir)
    problem = metrics.damage()
    if problem:
        raise ConfigError(f"{problem}: the file was damaged or edited; restore it from a backup.")
    return list(metrics.lines)
