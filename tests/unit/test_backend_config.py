"""Ray is sized to the cores this process may use, so a pinned run never starts more sites than it has cores."""

from __future__ import annotations

import os

import pytest

from fedtune.simulations import simulate


@pytest.mark.parametrize(("cores", "sites", "ray_cpus", "site_cpus"), [
    ({0}, 4, 1, 1), ({0, 1}, 4, 2, 1), ({3}, 1, 1, 1), ({0, 1}, 1000, 2, 1),
    # fewer sites than cores: each site gets its share as threads, so no core sits idle
    ({0, 1, 2, 3}, 2, 4, 2), ({0, 1}, 1, 2, 2), (set(range(64)), 4, 64, 16), (set(range(7)), 3, 6, 2),
])
def test_ray_shares_the_usable_cores_among_the_sites(monkeypatch, cores, sites, ray_cpus, site_cpus):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cores), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)  # the machine's count must not be what is used
    config = simulate.backend_config(sites)
    assert config["init_args"]["num_cpus"] == ray_cpus
    assert config["client_resources"] == {"num_cpus": site_cpus, "num_gpus": 0.0}
    assert ray_cpus // site_cpus == min(sites, len(cores)), "as many sites at once as the cores allow"


def test_on_an_existing_ray_cluster_a_site_takes_one_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert simulate.backend_config(4, cluster=True)["client_resources"]["num_cpus"] == 1
