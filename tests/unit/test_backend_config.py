"""Ray is sized to the cores this process may use, so a pinned run never starts more sites than it has cores."""

from __future__ import annotations

import os

import pytest

from fedtune.simulations import simulate


@pytest.mark.parametrize(("cores", "sites", "expected"), [({0}, 4, 1), ({0, 1}, 4, 2), ({0, 1, 2, 3}, 2, 2), ({3}, 1, 1)])
def test_ray_gets_one_cpu_per_site_up_to_the_usable_cores(monkeypatch, cores, sites, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cores), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's count must not be what is used
    config = simulate.backend_config(sites)
    assert config["init_args"]["num_cpus"] == expected
    assert config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
