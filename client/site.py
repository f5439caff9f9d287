"""Who this site is, where its data and ledger live, and what it may spend.

A deployed site takes all of this from its own ``node_config`` (written by ``fedtune site``):
nothing the coordinator sends can point it at other files or raise its budget. A simulated site
(Flower sets ``partition-id``) takes its partition of the run's table and keeps its ledger inside
the run directory, so a new simulation starts fresh while a resumed one continues.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedtune.common.config import DataConfig, RunConfig
from fedtune.common.errors import ConfigError

from .policy import SitePolicy, policy_for

# node_config keys a deployed site must set.
NODE_KEYS = ("site-name", "data-path", "state-dir", "budget-epsilon")


@dataclass(frozen=True, kw_only=True)
class SiteSettings:
    """A site's own settings.

    Attributes:
        name: The site's name in logs and summaries.
        data: Its data file and columns (simulated sites: the run's shared table).
        state_dir: Folder of the persistent privacy ledger.
        budget_epsilon: Lifetime epsilon budget of each record; a site setting only.
        delta: delta of the site's guarantee.
        partition: Index of the simulated site's partition, None when deployed.
        num_partitions: Number of simulated sites.
        base_model: A deployed site's own base model folder ("": the packaged default); None in
            simulation, where the run's model is used. The coordinator never picks a site's files.
        policy: What the site accepts from a run (``[policy]`` in site.toml; see ``policy.py``).
        labels: The label set a deployed site publishes (``[data] labels``); a run is checked
            against it, so the answer depends on the site's config, never on its data. Empty:
            the run's labels are checked against the data (which tells the coordinator whether
            the site's labels lie inside the run's set).
        val_fraction: The site's own validation fraction (deployed: ``[data] val_fraction``;
            simulated: the run's). A run never picks a deployed site's validation rows.
    """

    name: str
    data: DataConfig
    state_dir: Path
    budget_epsilon: float
    delta: float
    partition: int | None = None
    num_partitions: int | None = None
    base_model: str | None = None
    policy: SitePolicy = dataclasses.field(default_factory=SitePolicy)
    val_fraction: float = 0.1
    labels: tuple[str, ...] = ()

    @property
    def simulated(self) -> bool:
        return self.partition is not None


def resolve_site(node_config: Mapping[str, Any], run: RunConfig, *, run_dir: str) -> SiteSettings:
    """Build the site's settings from Flower's node_config (and, in simulation, the run config).

    Raises:
        PolicyRefusal: ``policy:task`` when a deployed site's policy does not allow the run's task.
            Both task paths call this first, so the refusal comes before the site reads its data,
            its model or its tokenizer.
    """
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        name = f"site-{pid}"
        return SiteSettings(
            name=name,
            data=run.data,
            state_dir=Path(run_dir) / "sites" / name,
            budget_epsilon=run.privacy.target_epsilon,
            delta=run.privacy.delta,
            partition=pid,
            num_partitions=int(node_config.get("num-partitions", run.federation.sites)),
            policy=policy_for(node_config, simulation_statistics=run.privacy.statistics,
                              simulation_max_lora_rank=run.lora.rank_of_site(pid)),
            val_fraction=run.data.val_fraction,
        )
    missing = [k for k in NODE_KEYS if k not in node_config]
    if missing:
        raise ConfigError(
            f"this site's node-config lacks {missing}; start it with `fedtune site start`, which sets {list(NODE_KEYS)}."
        )
    try:
        budget = float(node_config["budget-epsilon"])
        delta = float(node_config.get("delta", run.privacy.delta))
        val_fraction = float(node_config.get("val-fraction", 0.1))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"node-config budget-epsilon, delta and val-fraction must be numbers: {err}") from None
    if budget <= 0:
        raise ConfigError(f"node-config budget-epsilon must be > 0, got {budget}.")
    data = dataclasses.replace(
        run.data,
        path=str(node_config["data-path"]),
        text_column=str(node_config.get("text-column", run.data.text_column)),
        label_column=str(node_config.get("label-column", run.data.label_column)),
        # causal-lm: the site's own columns when its node-config names them (the run's otherwise).
        prompt_column=str(node_config.get("prompt-column", run.data.prompt_column)),
        response_column=str(node_config.get("response-column", run.data.response_column)),
        messages_column=str(node_config.get("messages-column", run.data.messages_column)),
        partition="iid",
    )
    policy = policy_for(node_config)
    policy.check_task(run.task)
    return SiteSettings(
        name=str(node_config["site-name"]),
        data=data,
        state_dir=Path(str(node_config["state-dir"])),
        budget_epsilon=budget,
        delta=delta,
        base_model=str(node_config.get("base-model", "")),
        policy=policy,
        val_fraction=val_fraction,
        labels=_published_labels(node_config),
    )


def _published_labels(node_config: Mapping[str, Any]) -> tuple[str, ...]:
    import json

    raw = node_config.get("labels")
    if raw is None:
        return ()
    try:
        labels = json.loads(str(raw))
    except json.JSONDecodeError:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ConfigError(f"node-config labels must be a JSON list of strings, got {raw!r}.")
    return tuple(labels)
