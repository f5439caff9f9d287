"""site.toml and the commands built from it: what a deployed site runs, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fedtune.client.daemon import load_site_config, supernode_command, write_site_config
from fedtune.client.policy import SitePolicy, policy_from_node_config
from fedtune.common.config import RunConfig
from fedtune.common.errors import ConfigError
from fedtune.server.coordinator import app_dir, run_config_args


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_written_site_config_round_trips_with_absolute_paths(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "notes.csv").write_text("text,label\n")
    path = write_site_config(tmp_path / "site", name="hospital-a", coordinator="coord:9093", ca=tmp_path / "ca.crt",
                             data=tmp_path / "notes.csv", text_column="note", label_column="dept", budget_epsilon=4.0, delta=1e-6)
    site = load_site_config(path)
    assert site.name == "hospital-a" and site.budget_epsilon == 4.0 and site.delta == 1e-6
    assert site.node_key == (tmp_path / "site" / "node-key").resolve() and site.state_dir.is_absolute()
    assert site.node_config() == {
        "site-name": "hospital-a", "data-path": str((tmp_path / "notes.csv").resolve()), "state-dir": str(site.state_dir),
        "budget-epsilon": 4.0, "delta": 1e-6, "text-column": "note", "label-column": "dept",
        "base-model": "", "val-fraction": 0.1, **SitePolicy().to_node_config(),
    }


def test_site_policy_reaches_the_clientapp_through_flowers_node_config_parser(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args  # the parser flower-supernode applies

    path = _write(tmp_path, '[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "d.csv"\n'
                            '[policy]\nmax_epsilon_per_run = 3.5\nrequire_secure_agg = true\nmin_secure_agg_threshold = 3\n'
                            'min_secure_agg_participants = 4\nstatistics = "dp"\n')
    site = load_site_config(path)
    cmd = supernode_command(site)

    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])

    assert policy_from_node_config(node_config) == site.policy
    assert site.policy == SitePolicy(max_epsilon_per_run=3.5, require_secure_agg=True, min_secure_agg_threshold=3,
                                     min_secure_agg_participants=4, statistics="dp")


def test_policy_problems_name_the_key_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path, '[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "d.csv"\n'
                            '[policy]\nstatistics = "everything"\nmax_sample_rate = 2\nmin_noise = 1\n')
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    text = str(info.value)
    assert "policy.statistics must be one of ['none', 'dp', 'clear'], got 'everything'" in text
    assert "policy.max_sample_rate must be in (0, 1], got 2.0" in text
    assert "unknown key policy.min_noise" in text


def test_legacy_allow_no_dp_still_sets_the_policy(tmp_path: Path) -> None:
    path = _write(tmp_path, '[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "d.csv"\n'
                            '[privacy]\nallow_no_dp = true\n')
    assert load_site_config(path).policy.require_dp is False


def test_every_problem_in_site_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[site]\nname = "bad name!"\ncoordinator = "nohostport"\nfoo = 1\n[privacy]\nbudget_epsilon = -1\ndelta = 2\n')
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    text = str(info.value)
    for expected in ("site.name may hold", "site.coordinator must be HOST:PORT, got 'nohostport'", "unknown key site.foo",
                     "data.path is required", "site.ca is required", "privacy.budget_epsilon must be > 0", "privacy.delta must be in (0, 1)"):
        assert expected in text
    assert all(p.startswith(str(path)) for p in info.value.problems)


def test_supernode_command_carries_tls_node_key_and_quoted_node_config(tmp_path: Path) -> None:
    path = _write(tmp_path, '[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\nca = "ca.crt"\nnode_key = "node-key"\n'
                            '[data]\npath = "my data/notes v2.csv"\n')
    cmd = supernode_command(load_site_config(path), runtime_port=9100, extra_node_config={"worker-address": "/s/w.sock"})
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:9093"
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "node-key")
    assert "--insecure" not in cmd
    from flwr.common.config import parse_config_args  # the parser flower-supernode applies

    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert node_config["data-path"] == str(tmp_path / "my data/notes v2.csv")
    assert node_config["budget-epsilon"] == 8.0 and node_config["worker-address"] == "/s/w.sock"


def test_a_path_flower_cannot_quote_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, '[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\nca = "ca.crt"\nnode_key = "k"\n[data]\npath = "a\\"b.csv"\n')
    with pytest.raises(ConfigError, match="double quote"):
        supernode_command(load_site_config(path))


def test_insecure_site_needs_no_keys_and_says_so(tmp_path: Path) -> None:
    path = _write(tmp_path, '[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "d.csv"\n')
    cmd = supernode_command(load_site_config(path))
    assert "--insecure" in cmd and "--root-certificates" not in cmd


def test_run_config_goes_to_flower_as_one_argument_with_toml_values() -> None:
    flat = {"data.labels": "a,b", "data.path": "", "privacy.enabled": False, "federation.rounds": 3, "privacy.delta": 1e-05}
    args = run_config_args(flat)
    assert args[0] == "--run-config" and len(args) == 2
    from flwr.common.config import parse_config_args  # the parser `flwr run` applies

    assert parse_config_args([args[1]]) == flat


def test_flower_app_folder_declares_every_run_config_key() -> None:
    folder = app_dir(RunConfig().to_flat())
    doc = tomllib.loads((folder / "pyproject.toml").read_text())
    app = doc["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"}
    declared = {f"{s}.{k}" for s, t in app["config"].items() if isinstance(t, dict) for k in t} | {k for k, v in app["config"].items() if not isinstance(v, dict)}
    assert declared == set(RunConfig().to_flat())


def test_supernode_command_runs_flowers_supernode_through_the_poll_entry_point(tmp_path: Path) -> None:
    import sys

    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    path = _write(tmp_path, '[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\nca = "ca.crt"\nnode_key = "node-key"\n'
                            '[data]\npath = "d.csv"\n')
    cmd = supernode_command(load_site_config(path), runtime_port=9100, max_retries=3)
    assert cmd[:3] == [sys.executable, "-m", "fedtune.client.supernode"]
    args = _parse_args_run_supernode().parse_args(cmd[3:])  # what flower-supernode itself accepts
    assert args.superlink == "127.0.0.1:9093" and args.max_retries == 3


def test_a_site_can_pin_its_own_base_model_folder(tmp_path: Path) -> None:
    path = _write(tmp_path, '[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "d.csv"\n'
                            '[model]\nbase_model = "models/minilm"\n')
    site = load_site_config(path)
    assert site.base_model == tmp_path / "models" / "minilm"
    assert site.node_config()["base-model"] == str(tmp_path / "models" / "minilm")


def test_without_a_pinned_model_the_site_uses_the_packaged_one(tmp_path: Path) -> None:
    path = _write(tmp_path, '[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "d.csv"\n')
    assert load_site_config(path).node_config()["base-model"] == ""


def test_a_taken_runtime_port_is_refused_naming_the_flag_before_anything_starts() -> None:
    import socket

    from fedtune.client.daemon import check_runtime_port

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"--runtime-port {port}: 127.0.0.1:{port} is already in use"):
            check_runtime_port(port, wait=0.6)
    check_runtime_port(port, wait=0)  # free again: accepted
