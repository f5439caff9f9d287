"""The typed run configuration: every problem reported at once, every form round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.common.config import RunConfig, dump_toml, from_dict, from_flat, load_toml
from fedtune.common.errors import ConfigError


def test_defaults_are_the_documented_demo() -> None:
    run = RunConfig()
    assert run.federation.sites == 3 and run.privacy.enabled and run.privacy.target_epsilon == 8.0 and run.privacy.delta == 1e-5


def test_every_problem_is_reported_in_one_error() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"privacy": {"delta": 2, "clip_norm": -1, "nosuch": 1}, "federation": {"rounds": "x"}, "bogus": 1})
    text = str(info.value)
    assert len(info.value.problems) == 5
    assert "privacy.delta must be in (0, 1), got 2.0" in text
    assert "privacy.clip_norm must be > 0 (or 0: the task's default), got -1.0" in text
    assert "unknown key privacy.nosuch" in text and "unknown key 'bogus'" in text
    assert "federation.rounds must be an integer, got 'x'" in text


def test_min_sites_cannot_exceed_sites() -> None:
    with pytest.raises(ConfigError, match=r"federation.min_sites \(4\) must be <= federation.sites \(3\)"):
        from_dict({"federation": {"min_sites": 4}})


@pytest.mark.parametrize("bad", ["dirichlet:0", "dirichlet:x", "column:", "random"])
def test_bad_partition_names_value_and_allowed_forms(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"data": {"partition": bad}})
    assert repr(bad) in str(info.value) or bad.split(":")[-1] in str(info.value)
    assert "dirichlet:ALPHA" in str(info.value)


def test_flat_flower_form_round_trips() -> None:
    run = from_dict({"lora": {"rank": 4, "target_modules": ["query", "key"]}, "data": {"labels": ["a", "b"]}, "seed": 3})
    flat = run.to_flat()
    assert flat["lora.target_modules"] == "query,key" and flat["data.labels"] == "a,b"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert from_flat(flat) == run


def test_toml_round_trips_and_errors_name_the_file(tmp_path: Path) -> None:
    run = from_dict({"federation": {"rounds": 7}, "privacy": {"enabled": False}})
    path = tmp_path / "config.toml"
    dump_toml(run, path)
    assert load_toml(path) == run
    (tmp_path / "bad.toml").write_text("[privacy]\ndelta = 5\n")
    with pytest.raises(ConfigError, match=r"bad.toml: privacy.delta"):
        load_toml(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nrounds = 9\nsites = 4\n")
    run = from_dict({"federation": {"rounds": 2}}, base=load_toml(path))
    assert run.federation.rounds == 2 and run.federation.sites == 4


def test_shipped_scenarios_and_pyproject_app_config_load() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    scenarios = sorted((root / "simulations" / "scenarios").glob("*.toml"))
    assert scenarios, "ship at least one scenario file"
    for path in scenarios:
        load_toml(path)
    app_config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = {
        **{f"{section}.{k}": v for section, table in app_config.items() if isinstance(table, dict) for k, v in table.items()},
        **{k: v for k, v in app_config.items() if not isinstance(v, dict)},
    }
    # `flwr run` only accepts overrides of declared keys: declare every key, with fedtune's defaults.
    assert flat == RunConfig().to_flat()
    assert from_flat(flat) == RunConfig()


def test_the_clip_norm_defaults_per_task_and_an_explicit_one_wins_over_any_layering() -> None:
    # A fresh causal-LM adapter's per-example gradients have norm ~0.02: C = 1 would clip nothing
    # (docs/generative.md), so its default is 0.01; the classifier's stays 1.
    assert RunConfig().clip_norm == 1.0
    assert from_dict({"task": "causal-lm"}).clip_norm == 0.01
    # The task may come after the rest (a config file, then --task): the default follows the final task.
    assert from_dict({"task": "causal-lm"}, base=from_dict({"privacy": {"target_epsilon": 3.0}})).clip_norm == 0.01
    assert from_dict({"task": "causal-lm", "privacy": {"clip_norm": 0.5}}).clip_norm == 0.5
    assert from_dict({"task": "causal-lm"}, base=from_dict({"privacy": {"clip_norm": 2.0}})).clip_norm == 2.0
    # The setting itself stays 0 ("the task's default") in config.toml, as learning_rate and max_length do.
    assert from_dict({"task": "causal-lm"}).to_dict()["privacy"]["clip_norm"] == 0.0
