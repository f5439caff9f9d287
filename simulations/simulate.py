"""N simulated sites on one machine, through Flower's simulation engine (Ray).

The same ServerApp and ClientApp as a deployment run; the resolved config is injected into their
Flower contexts, exactly where ``flwr run`` would put it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.common.config import RunConfig
from fedtune.common.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.common.init_adapter import EarlierAdapter

logger = logging.getLogger(__name__)


def backend_config(num_sites: int, *, cluster: bool = False) -> dict:  # type: ignore[type-arg]
    """The usable cores shared out among the simulated sites: as many sites at once as there are cores,
    and, with fewer sites than cores, several cores a site (Flower's default of 2 CPUs a site would run
    one site at a time on 2 cores; 1 a site would leave 60 of 64 cores idle with 4 sites).

    A site's CPUs are its threads: Ray sets OMP_NUM_THREADS to them in the site's worker, and torch
    takes its thread count from it. The cores counted are those this process may run on (``taskset``,
    a cpuset), not the machine's: a run pinned to one core of two would otherwise start two sites
    that share it. On an existing Ray cluster (``cluster``) a site takes one CPU: this machine's cores
    say nothing of the nodes', and a site wider than a node would fit nowhere.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_site = 1 if cluster else max(1, cpus // max(1, num_sites))
    return {
        "client_resources": {"num_cpus": per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, min(cpus, num_sites * per_site)), "include_dashboard": False},
    }


@dataclass(frozen=True)
class Preflight:
    """A run that passed :func:`preflight`, and what it read: given to :func:`run_simulation`, nothing is read twice.

    Attributes:
        run: The run checked.
        resume: Whether it was checked as a resumed run.
        earlier: The earlier adapter (``model.init_adapter``) as read and checked; None without one, or on a resume.
    """

    run: RunConfig
    resume: bool
    earlier: EarlierAdapter | None


def preflight(run: RunConfig, *, resume: bool = False) -> Preflight:
    """Check the model folder, the data and the split before any process starts; returns what was
    checked, with the earlier adapter (``model.init_adapter``) as read.

    Errors then reach the user as one clear line, not as a failure inside a Ray worker. A resumed
    run (``resume``) does not read its earlier adapter: its checkpoint holds the arrays and records
    the labels and lineage (``server/resume.py``), and the folder may have moved since.
    """
    from fedtune.common.data import check_labels
    from fedtune.common.model import resolve_base_model
    from fedtune.common.sitedata import load_config_table, run_labels, simulated_split

    resolve_base_model(run.model, run.task)  # causal-lm's default base is converted here on first use
    if run.causal_lm:  # prompt/response examples, no labels; the same split the coordinator and sites make
        from fedtune.common.lm_site import load_config_lm_table, simulated_lm_split

        simulated_lm_split(load_config_lm_table(run.data), run.data, num_sites=run.federation.sites, seed=run.seed)
        return Preflight(run=run, resume=resume, earlier=None if resume else _check_init_adapter(run, []))
    table = load_config_table(run.data)
    labels = run_labels(run.data, table)
    check_labels(table, labels)
    if len(labels) < 2:
        raise ConfigError(f"{table.source}: found only the label(s) {labels}; classification needs at least 2.")
    simulated_split(table, run.data, num_sites=run.federation.sites, seed=run.seed)
    return Preflight(run=run, resume=resume, earlier=None if resume else _check_init_adapter(run, labels))


def _check_init_adapter(run: RunConfig, labels: list[str]) -> EarlierAdapter | None:
    """Refuse an earlier adapter that does not fit the run (``common/init_adapter.py``) before any site starts."""
    if not run.model.init_adapter:
        return None
    from fedtune.common.init_adapter import check_fits, labels_with_earlier, read_earlier_adapter

    earlier = read_earlier_adapter(run.model.init_adapter)
    if labels and earlier.task == run.task:
        labels = labels_with_earlier(earlier, labels, explicit=bool(run.data.labels))
    check_fits(earlier, run, labels)
    if earlier.simulated and earlier.site_ledgers is None:
        raise ConfigError(f"model.init_adapter {earlier.folder} comes from a simulation, but its run directory's site ledgers "
                          "(RUN_DIR/sites) are not beside it: this run's sites could not continue them, and would count their "
                          "records' spend from zero. Give the adapter folder inside its run directory.")
    return earlier


def continue_site_ledgers(earlier_sites: Path, run_dir: Path, *, sites: int, budget_epsilon: float, delta: float) -> Path:
    """Start each simulated site's ledger from the earlier simulation's (``--init-adapter``); returns the marker file.

    A simulated site keeps its ledger in the run directory (``RUN_DIR/sites/site-K``), so a new run
    would otherwise count from zero. Each new site's ledger starts from the union of *all* the
    earlier run's site ledgers: accounting is per record, so each record carries what it spent in
    whichever earlier site held it, and a changed split (new rows, new labels, another site count)
    forgets nothing; with the same split, site-K's records carry exactly site-K's earlier charges
    (the others touch none of them). The earlier ledgers are only read. Refused (nothing written)
    when a record has already spent ``budget_epsilon`` (``privacy.target_epsilon``, a simulated
    site's lifetime budget): the sites would refuse every round, so the run stops before any starts.

    Raises:
        PrivacyBudgetError: the worst record's spend is at or past ``budget_epsilon``.
    """
    from fedtune.client.ledger_state import LEDGER_FILE, LedgerState, read_state
    from fedtune.common.errors import PrivacyBudgetError
    from fedtune.common.init_adapter import CONTINUED_LEDGERS_FILE
    from fedtune.common.io import atomic_write_bytes, atomic_write_json

    earlier = {d.name: read_state((d / LEDGER_FILE).read_bytes(), d / LEDGER_FILE)
               for d in sorted(earlier_sites.iterdir()) if (d / LEDGER_FILE).is_file()}

    def merged(into: LedgerState, own: str | None) -> LedgerState:
        for name, state in earlier.items():
            for cid, records in state.cohorts.items():
                if cid not in into.cohorts:
                    into.cohorts[cid] = records
                    if records is not None:
                        into.sorted_records[cid] = state.sorted_records.get(cid) or sorted(records)
            into.charges.extend(c for c in state.charges if c not in into.charges)  # idempotent: a rerun adds nothing
            into.add_links(state.derived, what=f"the earlier run's {name}", time=time.time())  # lineages, if any (site prepare)
            if name == own:  # its noise plans (keyed by the earlier run's id): a record of how it was planned
                for run, plan in state.plans.items():
                    into.plans.setdefault(run, plan)
        into.charges.sort(key=lambda c: c.time)
        return into

    union = merged(LedgerState(), None)
    records = frozenset().union(*(r for r in union.cohorts.values() if r is not None))
    worst = max((union.epsilon(h, delta=delta, accountant=None) for h in union.maximal(union.histories(records))), default=0.0)
    if worst >= budget_epsilon:
        raise PrivacyBudgetError(
            f"the earlier run's sites ({earlier_sites}) have spent epsilon up to {worst:.3f}; this run's budget "
            f"privacy.target_epsilon is {budget_epsilon:g} (a simulated site's lifetime budget), so no privacy is left: "
            f"raise privacy.target_epsilon above {worst:.3f} to train more.",
            budget=budget_epsilon, spent=worst, requested=0.0,
        )
    for k in range(sites):
        name = f"site-{k}"  # a simulated site's name and ledger folder (client/site.py)
        path = run_dir / "sites" / name / LEDGER_FILE
        state = merged(read_state(path.read_bytes(), path) if path.is_file() else LedgerState(), name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, state.to_bytes())
    marker = run_dir / CONTINUED_LEDGERS_FILE
    atomic_write_json(marker, {"from": str(earlier_sites), "sites": [f"site-{k}" for k in range(sites)],
                               "runs": sorted({c.run for c in union.charges}), "max_epsilon": worst})
    logger.info("the %d simulated sites continue the ledgers of %s (worst record: epsilon %.3f of %g)",
                sites, earlier_sites, worst, budget_epsilon)
    return marker


def run_simulation(run: RunConfig, *, resume: bool = False, ray_address: str | None = None, verbose: bool = False,
                   checked: Preflight | None = None) -> Path:
    """Run a whole federated simulation; returns the run directory.

    ``checked``: this run's :func:`preflight`, if the caller already ran it (None: it runs here).

    ``resume``: continue the run in ``run.out`` (``fedtune simulate --resume`` has left the request
    that the coordinator checks, see ``server/resume.py``) instead of refusing a used directory.
    ``ray_address``: run the simulated sites on an existing Ray cluster (``ray start --head`` and
    ``ray start --address``; every node needs this fedtune and its data path) instead of a Ray
    started on this machine. ``verbose``: show Flower's and Ray's logs and third-party warnings on
    the terminal too; they always go to ``RUN_DIR/log.txt`` (``simulations/console.py``).
    """
    from fedtune.common.environment import OFFLINE

    for key, value in OFFLINE.items():  # no hub and no per-run dependency installation, ever
        os.environ.setdefault(key, value)
    import warnings

    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedtune.client.app import build_client_app
    from fedtune.server.app import build_server_app, resolve_run_dir

    if checked is None:
        checked = preflight(run, resume=resume)
    elif checked.run != run or checked.resume != resume:
        raise ValueError("run_simulation: `checked` is the preflight of another run (or resume flag); pass this run's.")
    earlier = checked.earlier  # read once: the ledgers below need only what preflight read
    run_dir = resolve_run_dir(run, 0)
    if not resume and ((run_dir / "metrics.jsonl").exists() or (run_dir / "run.json").exists()):
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with `fedtune simulate --resume {run_dir}` "
                          "or choose another --out.")
    if earlier is not None:  # before any site starts: its ledger must count the earlier runs (not on resume)
        if earlier.site_ledgers is not None:
            continue_site_ledgers(earlier.site_ledgers, run_dir, sites=run.federation.sites,
                                  budget_epsilon=run.privacy.target_epsilon if run.privacy.enabled else math.inf,
                                  delta=run.privacy.delta)
        elif earlier.simulated:  # preflight refuses it too; kept here so no path skips the check
            raise ConfigError(f"model.init_adapter {earlier.folder}: its simulation's site ledgers are not beside it.")
    flat = run.to_flat()
    flat["out"] = str(run_dir)
    from .console import init_ray, run_console

    config = backend_config(run.federation.sites, cluster=ray_address is not None)
    with run_console(run_dir, verbose=verbose) as log_file, warnings.catch_warnings():
        init_ray(address=ray_address, num_cpus=config["init_args"]["num_cpus"], log_file=log_file, verbose=verbose)
        # Flower 1.42 marks run_simulation deprecated in favour of `flwr run` (its notice goes to log.txt).
        # Kept, with flwr pinned to 1.42.* in pyproject.toml: it is the in-process engine that takes app
        # objects with the resolved config injected, keeps the coordinator's round lines on this terminal
        # and its errors in this process; `flwr run` would add a SuperLink process, a FAB and every
        # setting as a --run-config string. Revisit when Flower removes it.
        warnings.simplefilter("ignore", DeprecationWarning)
        flwr_run_simulation(
            server_app=build_server_app(flat, earlier=earlier),  # read once, by the preflight
            client_app=build_client_app(flat),
            num_supernodes=run.federation.sites,
            backend_config=config,
        )
    if not (run_dir / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without a summary in {run_dir}; see the log above and {run_dir / 'log.txt'}.")
    return run_dir
