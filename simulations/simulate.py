"""N simulated sites on one machine, through Flower's simulation engine (Ray).

The same ServerApp and ClientApp as a deployment run; the resolved config is injected into their
Flower contexts, exactly where ``flwr run`` would put it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedtune.common.config import RunConfig
from fedtune.common.errors import ConfigError

logger = logging.getLogger(__name__)


def backend_config(num_sites: int) -> dict:  # type: ignore[type-arg]
    """One CPU per simulated site (Flower's default of 2 would run one site at a time on 2 cores)."""
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, min(cpus, num_sites)), "include_dashboard": False},
    }


def preflight(run: RunConfig) -> None:
    """Check the model folder, the data and the split before any process starts.

    Errors then reach the user as one clear line, not as a failure inside a Ray worker.
    """
    from fedtune.common.data import check_labels
    from fedtune.common.model import resolve_base_model
    from fedtune.common.sitedata import load_config_table, run_labels, simulated_split

    resolve_base_model(run.model, run.task)  # causal-lm's default base is converted here on first use
    if run.causal_lm:  # prompt/response examples, no labels; the same split the coordinator and sites make
        from fedtune.common.lm_site import load_config_lm_table, simulated_lm_split

        simulated_lm_split(load_config_lm_table(run.data), run.data, num_sites=run.federation.sites, seed=run.seed)
        return
    table = load_config_table(run.data)
    labels = run_labels(run.data, table)
    check_labels(table, labels)
    if len(labels) < 2:
        raise ConfigError(f"{table.source}: found only the label(s) {labels}; classification needs at least 2.")
    simulated_split(table, run.data, num_sites=run.federation.sites, seed=run.seed)


def run_simulation(run: RunConfig, *, resume: bool = False) -> Path:
    """Run a whole federated simulation; returns the run directory.

    ``resume``: continue the run in ``run.out`` (``fedtune simulate --resume`` has left the request
    that the coordinator checks, see ``server/resume.py``) instead of refusing a used directory.
    """
    from fedtune.common.environment import OFFLINE

    for key, value in OFFLINE.items():  # no hub and no per-run dependency installation, ever
        os.environ.setdefault(key, value)
    import warnings

    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedtune.client.app import build_client_app
    from fedtune.server.app import build_server_app, resolve_run_dir

    preflight(run)
    run_dir = resolve_run_dir(run, 0)
    if not resume and ((run_dir / "metrics.jsonl").exists() or (run_dir / "run.json").exists()):
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with `fedtune simulate --resume {run_dir}` "
                          "or choose another --out.")
    flat = run.to_flat()
    flat["out"] = str(run_dir)
    with warnings.catch_warnings():
        # run_simulation is marked deprecated in favour of `flwr run`; it is still Flower's
        # in-process simulation engine, and the one that takes app objects with injected config.
        warnings.simplefilter("ignore", DeprecationWarning)
        flwr_run_simulation(
            server_app=build_server_app(flat),
            client_app=build_client_app(flat),
            num_supernodes=run.federation.sites,
            backend_config=backend_config(run.federation.sites),
        )
    if not (run_dir / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without a summary in {run_dir}; see the log above.")
    return run_dir
