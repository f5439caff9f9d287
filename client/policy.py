"""The site's policy: limits only the site's operator sets (``[policy]`` in ``site.toml``).

Nothing a run sends can loosen them. Each check runs before training and before any budget is
charged; a run that asks for more is refused with a code from ``common.messages.RefusalCode``
(e.g. ``policy:max-epsilon``) on the wire, and the setting, the site's limit and the value asked
in the site's own log.

```toml
[policy]
max_epsilon_per_run = 8.0         # the largest target epsilon one run may ask for
min_noise_multiplier = 0.5        # DP-SGD's z, asked for or calibrated, must be at least this
max_clip_norm = 10.0              # DP-SGD's per-example clip norm C
require_dp = true                 # refuse runs without DP-SGD
require_secure_agg = false        # refuse plain (unmasked) train messages
min_secure_agg_threshold = 2      # SecAgg+: the fewest sites needed to unmask
min_secure_agg_participants = 2   # SecAgg+: the fewest sites sharing a round
min_steps_per_round = 1           # DP-SGD logical steps one round may take
max_steps_per_round = 10000
max_sample_rate = 1.0             # q = batch / n; lower it to insist on sampling amplification
statistics = "none"               # what else may leave: none | dp | clear
statistics_noise_multiplier = 2.0 # z of the Gaussian mechanism on released statistics (statistics = "dp")
statistics_loss_bound = 5.0       # per-example loss clipped to [0, L] before it is summed
max_lora_rank = 0                 # train at most this LoRA rank (0: the run's); not a refusal
allowed_tasks = ["classification"] # tasks a run may train here: classification, causal-lm
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from fedtune.common.config import TASKS, coerce_setting, unknown_key
from fedtune.common.errors import ConfigError, PolicyRefusal
from fedtune.common.lora_rank import site_lora_rank
from fedtune.common.messages import RefusalCode

STATISTICS_MODES = ("none", "dp", "clear")
# Prefix of the policy's keys in Flower's node_config (flat, like the rest of it).
NODE_PREFIX = "policy."


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """What this site accepts from a run. Defaults are those of a deployed site that set nothing.

    Attributes:
        max_epsilon_per_run: Largest ``privacy.target_epsilon`` a run may ask for (the ledger's
            lifetime budget is separate and also enforced).
        min_noise_multiplier: Smallest DP-SGD noise multiplier z accepted, whether the run fixes z
            or the site calibrates it from the run's target and plan.
        max_clip_norm: Largest per-example clip norm C accepted.
        require_dp: Refuse runs without DP-SGD.
        require_secure_agg: Refuse train messages that are not part of a SecAgg+ round.
        min_secure_agg_threshold: SecAgg+: refuse a round whose reconstruction threshold is lower.
        min_secure_agg_participants: SecAgg+: refuse a round shared by fewer sites.
        min_steps_per_round / max_steps_per_round: Bounds on DP-SGD logical steps per round.
        max_sample_rate: Largest Poisson rate q = batch_size / n. q = 1 (a batch covering the whole
            split) is still DP-SGD, calibrated without amplification by sampling, so the default
            allows it (small sites with the default batch get q = 1); a site that wants every step
            to touch only a sample of its records lowers it.
        statistics: What may leave besides the adapter and the privacy parameters: 'none',
            'dp' (validation statistics under the Gaussian mechanism, charged to the ledger), or
            'clear' (exact validation and training statistics; the report and model card say so).
        statistics_noise_multiplier: z_s of the Gaussian mechanism on released statistics.
        statistics_loss_bound: L, the bound each example's loss is clipped to before summing.
        max_lora_rank: The highest LoRA rank this site trains (its hardware, or its choice); 0:
            no limit. Not a refusal: a run of rank r is trained at min(r, max_lora_rank), on the
            first rank slots of the global adapter, and the coordinator pads the reply with the
            global adapter's values, so the site's update is zero in the slots it did not train
            (``common/lora_rank.py``).
        allowed_tasks: The tasks a run may train on this site's data. Classification only unless
            the operator adds 'causal-lm': a generative model learns to write text and can repeat
            rare training sequences verbatim (Carlini et al. 2021, arXiv:2012.07805), which a
            classification head's label probabilities cannot. DP-SGD bounds that risk at the
            run's epsilon, but whether the site's text may be learned to be written is the
            operator's decision, not the coordinator's.
    """

    max_epsilon_per_run: float = 8.0
    min_noise_multiplier: float = 0.5
    max_clip_norm: float = 10.0
    require_dp: bool = True
    require_secure_agg: bool = False
    min_secure_agg_threshold: int = 2
    min_secure_agg_participants: int = 2
    min_steps_per_round: int = 1
    max_steps_per_round: int = 10_000
    max_sample_rate: float = 1.0
    statistics: str = "none"
    statistics_noise_multiplier: float = 2.0
    statistics_loss_bound: float = 5.0
    max_lora_rank: int = 0
    allowed_tasks: tuple[str, ...] = ("classification",)

    def lora_rank(self, run_rank: int) -> int:
        """The LoRA rank this site trains in a run of rank ``run_rank``: min(run_rank, max_lora_rank)."""
        return site_lora_rank(run_rank, self.max_lora_rank)

    def problems(self) -> list[str]:
        p: list[str] = []
        if not self.max_epsilon_per_run > 0:
            p.append(f"policy.max_epsilon_per_run must be > 0, got {self.max_epsilon_per_run}.")
        if not self.min_noise_multiplier >= 0:
            p.append(f"policy.min_noise_multiplier must be >= 0, got {self.min_noise_multiplier}.")
        if not self.max_clip_norm > 0:
            p.append(f"policy.max_clip_norm must be > 0, got {self.max_clip_norm}.")
        if self.min_secure_agg_threshold < 2:
            p.append(f"policy.min_secure_agg_threshold must be >= 2 (one site's sum is its update), got {self.min_secure_agg_threshold}.")
        if self.min_secure_agg_participants < self.min_secure_agg_threshold:
            p.append(f"policy.min_secure_agg_participants must be >= min_secure_agg_threshold ({self.min_secure_agg_threshold}), "
                     f"got {self.min_secure_agg_participants}.")
        if not 1 <= self.min_steps_per_round <= self.max_steps_per_round:
            p.append(f"policy.min_steps_per_round must be in [1, max_steps_per_round = {self.max_steps_per_round}], "
                     f"got {self.min_steps_per_round}.")
        if not 0 < self.max_sample_rate <= 1:
            p.append(f"policy.max_sample_rate must be in (0, 1], got {self.max_sample_rate}.")
        if self.statistics not in STATISTICS_MODES:
            p.append(f"policy.statistics must be one of {list(STATISTICS_MODES)}, got {self.statistics!r}.")
        if not self.statistics_noise_multiplier > 0:
            p.append(f"policy.statistics_noise_multiplier must be > 0, got {self.statistics_noise_multiplier}.")
        if not self.statistics_loss_bound > 0:
            p.append(f"policy.statistics_loss_bound must be > 0, got {self.statistics_loss_bound}.")
        if self.max_lora_rank < 0:
            p.append(f"policy.max_lora_rank must be >= 0 (0: the run's rank, no limit), got {self.max_lora_rank}.")
        unknown = [t for t in self.allowed_tasks if t not in TASKS]
        if unknown or not self.allowed_tasks or len(set(self.allowed_tasks)) != len(self.allowed_tasks):
            p.append(f"policy.allowed_tasks must list distinct tasks, at least one, of {list(TASKS)}, got {list(self.allowed_tasks)}.")
        return p

    # -- the checks a run must pass, before training --------------------------------------------
    def check_run(self, *, dp: bool, target_epsilon: float, clip_norm: float, steps: int, sample_rate: float) -> None:
        """Refuse (PolicyRefusal) a run that asks for more than this policy allows."""
        if not dp:
            if self.require_dp:
                _refuse(RefusalCode.REQUIRE_DP, "privacy.enabled", "true (policy.require_dp)", "false")
            return
        _at_most(RefusalCode.MAX_EPSILON, "privacy.target_epsilon", target_epsilon, self.max_epsilon_per_run, "policy.max_epsilon_per_run")
        _at_most(RefusalCode.MAX_CLIP_NORM, "privacy.clip_norm", clip_norm, self.max_clip_norm, "policy.max_clip_norm")
        _at_most(RefusalCode.MAX_SAMPLE_RATE, "sample rate q = train.batch_size / n", sample_rate, self.max_sample_rate,
                 "policy.max_sample_rate")
        _at_most(RefusalCode.MAX_STEPS, "DP-SGD steps per round", steps, self.max_steps_per_round, "policy.max_steps_per_round")
        if steps < self.min_steps_per_round:
            _refuse(RefusalCode.MIN_STEPS, "DP-SGD steps per round", f">= {self.min_steps_per_round} (policy.min_steps_per_round)", steps)

    def check_task(self, task: str) -> None:
        """Refuse a run whose task this site does not allow (checked before its data or model is read)."""
        if task not in self.allowed_tasks:
            _refuse(RefusalCode.TASK_NOT_ALLOWED, "the run's task", f"only {list(self.allowed_tasks)} (policy.allowed_tasks)", repr(task))

    def check_noise(self, noise_multiplier: float) -> None:
        if noise_multiplier < self.min_noise_multiplier:
            _refuse(RefusalCode.MIN_NOISE, "noise multiplier z", f">= {self.min_noise_multiplier:g} (policy.min_noise_multiplier)",
                    f"{noise_multiplier:.4g}")

    def check_secure_round(self, *, threshold: int, participants: int) -> None:
        if threshold < self.min_secure_agg_threshold:
            _refuse(RefusalCode.SECURE_AGG_THRESHOLD, "SecAgg+ reconstruction threshold",
                    f">= {self.min_secure_agg_threshold} (policy.min_secure_agg_threshold)", threshold)
        if participants < self.min_secure_agg_participants:
            _refuse(RefusalCode.SECURE_AGG_PARTICIPANTS, "SecAgg+ participants",
                    f">= {self.min_secure_agg_participants} (policy.min_secure_agg_participants)", participants)

    def check_plain_train(self) -> None:
        """A train message outside SecAgg+ would show this site's adapter to the coordinator."""
        if self.require_secure_agg:
            _refuse(RefusalCode.REQUIRE_SECURE_AGG, "secure aggregation", "SecAgg+ (policy.require_secure_agg)", "a plain train message")

    # -- node_config form -----------------------------------------------------------------------
    def to_node_config(self) -> dict[str, str | float | int]:
        """Flat ``policy.*`` entries for Flower's node_config (booleans as 'true'/'false')."""
        out: dict[str, str | float | int] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, tuple):  # node_config values are scalars; read back as a comma-separated list
                value = ",".join(value)
            out[NODE_PREFIX + f.name] = value
        return out


def _refuse(code: RefusalCode, setting: str, limit: str, asked: Any) -> None:
    raise PolicyRefusal(code, f"{setting} is {asked}; this site's policy allows {limit}.")


def _at_most(code: RefusalCode, setting: str, asked: float, limit: float, key: str) -> None:
    if asked > limit:
        _refuse(code, setting, f"at most {limit:g} ({key})", f"{asked:g}")


def policy_from_mapping(raw: Mapping[str, Any], *, legacy_allow_no_dp: bool | None = None) -> tuple[SitePolicy, list[str]]:
    """Parse ``[policy]`` (site.toml form); returns the policy and every problem found.

    ``legacy_allow_no_dp`` is ``[privacy] allow_no_dp`` of older site files: it sets
    ``require_dp`` unless ``[policy]`` names it itself.
    """
    defaults = SitePolicy()
    allowed = {f.name for f in dataclasses.fields(SitePolicy)}
    problems = [unknown_key(f"key policy.{k}", k, allowed) for k in raw if k not in allowed]
    values = {k: coerce_setting(f"policy.{k}", v, getattr(defaults, k), problems) for k, v in raw.items() if k in allowed}
    if legacy_allow_no_dp is not None and "require_dp" not in values:
        values["require_dp"] = not legacy_allow_no_dp
    policy = SitePolicy(**values)
    return policy, problems + policy.problems()


def policy_from_node_config(node_config: Mapping[str, Any]) -> SitePolicy:
    """The policy a deployed site's daemon wrote into its node_config."""
    raw = {k[len(NODE_PREFIX):]: v for k, v in node_config.items() if str(k).startswith(NODE_PREFIX)}
    legacy = node_config.get("allow-no-dp")
    policy, problems = policy_from_mapping(raw, legacy_allow_no_dp=None if legacy is None else str(legacy).lower() == "true")
    if problems:
        raise ConfigError([f"node-config: {p}" for p in problems])
    return policy


def simulation_policy(statistics: str, *, max_lora_rank: int = 0) -> SitePolicy:
    """A simulated site's policy: the researcher owns every simulated site's data, so no limit
    applies beyond what the run itself sets; the statistics mode and the site's LoRA rank
    (``lora.site_ranks``; 0: the run's) come from the run."""
    return SitePolicy(
        max_epsilon_per_run=float("inf"), min_noise_multiplier=0.0, max_clip_norm=float("inf"), require_dp=False,
        min_secure_agg_threshold=2, min_secure_agg_participants=2, max_steps_per_round=10**9, max_sample_rate=1.0,
        statistics=statistics, max_lora_rank=max_lora_rank, allowed_tasks=TASKS,
    )


def policy_for(node_config: Mapping[str, Any], *, simulation_statistics: str = "dp", simulation_max_lora_rank: int = 0) -> SitePolicy:
    """The policy of the site a node_config describes: a simulated site (Flower sets
    ``partition-id``) or a deployed one (its daemon writes ``policy.*``)."""
    if "partition-id" in node_config:
        return simulation_policy(simulation_statistics, max_lora_rank=simulation_max_lora_rank)
    return policy_from_node_config(node_config)
