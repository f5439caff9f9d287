"""A run whose app bundle ships its own ``fedtune/`` is refused by a real site daemon, before any of it runs.

Real processes on 127.0.0.1: a coordinator (flower-superlink, TLS and node authentication), one
site daemon (``fedtune site start``: warm worker and SuperNode), and ``flwr run`` of an attacker's
app folder. The bundle names ``fedtune.client.app:app`` like an honest one, but carries a
``fedtune/client/app.py`` that Flower would import instead of the site's own (the bundle's folder
comes first on ``sys.path``): on import it leaves a marker file, and its ClientApp reads the site's
data file and sends it back. Its ServerApp is a probe that sends one train message and writes
down what comes back. Marked slow (about a minute: the site's warm worker imports torch).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .deployment import Processes, fedtune, free_port, wait_for_tls, write_site_data

pytestmark = pytest.mark.slow

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedtune"
version = "0.1.0"
description = "looks like fedtune's run bundle"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "probe_server:app"
clientapp = "fedtune.client.app:app"

[tool.flwr.app.config]
rounds = 1
"""

# Imported on the site, it would leave a marker wherever it can write (the test's folder, or the
# site's Flower home and temporary folder, writable even under the site's write sandbox).
EVIL_CLIENTAPP = """\
import os
from pathlib import Path

for folder in ({marker_dir!r}, os.environ.get("FLWR_HOME", ""), os.environ.get("TMPDIR", "")):
    try:
        if folder:
            (Path(folder) / "evil-code-ran").write_text("the bundle's fedtune was imported on the site")
    except OSError:
        pass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    stolen = Path(str(context.node_config["data-path"])).read_text()
    return Message(RecordDict({{"stolen": ConfigRecord({{"data": stolen}})}}), reply_to=msg)
"""

PROBE_SERVER = """\
import json
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    deadline = time.monotonic() + 90
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict({{"config": ConfigRecord({{"server-round": 1}})}}), dst_node_id=n, message_type="train") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=90)) if messages else []
    result = [
        {{"error": r.has_error(), "code": r.error.code if r.has_error() else None,
          "reason": r.error.reason if r.has_error() else None,
          "records": [] if r.has_error() else sorted(r.content.keys())}}
        for r in replies
    ]
    with open({result_path!r}, "w") as f:
        json.dump({{"nodes": len(nodes), "replies": result}}, f)
"""


def write_malicious_app(folder: Path, *, marker_dir: Path, result_path: Path) -> Path:
    (folder / "fedtune" / "client").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "probe_server.py").write_text(PROBE_SERVER.format(result_path=str(result_path)))
    (folder / "fedtune" / "__init__.py").write_text("")
    (folder / "fedtune" / "client" / "__init__.py").write_text("")
    (folder / "fedtune" / "client" / "app.py").write_text(EVIL_CLIENTAPP.format(marker_dir=str(marker_dir)))
    return folder


def test_a_bundle_carrying_its_own_fedtune_is_refused_and_never_runs_on_the_site(tmp_path: Path) -> None:
    # Prepare: a coordinator and one site, as an operator sets them up.
    port, admin_port = free_port(), free_port()
    address, admin_address = f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}"
    env = {**os.environ, "FEDTUNE_HOME": str(tmp_path / "fedtune-home")}
    certs = tmp_path / "certs"
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs")
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    result_path = tmp_path / "probe-result.json"
    site_dir = tmp_path / "site-a"
    try:
        fedtune("certs", "init", "--out", str(certs), env=env)
        procs.start("coordinator", ["coordinator", "start", "--certs", str(certs), "--state", str(tmp_path / "coordinator-state"),
                                    "--port", str(port), "--admin-port", str(admin_port)], env)
        wait_for_tls(port, certs / "ca.crt")
        data = write_site_data(tmp_path / "site-a.csv", slice(0, 40))
        fedtune("site", "init", "--name", "site-a", "--data", str(data), "--coordinator", address, "--ca", str(certs / "ca.crt"),
                "--out", str(site_dir), env=env)
        fedtune("coordinator", "add-site", str(site_dir / "node-key.pub"), "--name", "site-a", "--coordinator", admin_address,
                "--certs", str(certs), env=env)
        site = procs.start("site-a", ["site", "start", "--config", str(site_dir / "site.toml"), "--threads", "1",
                                      "--runtime-port", str(free_port()), "--max-retries", "3"], env)
        app = write_malicious_app(tmp_path / "evil-app", marker_dir=marker_dir, result_path=result_path)

        # Execute: submit the attacker's app with admin credentials (a rogue admin, or a coordinator taken over).
        from fedtune.server.coordinator import admin_connection, flwr_command

        os.environ["FEDTUNE_HOME"] = env["FEDTUNE_HOME"]
        try:
            conn, flwr_env = admin_connection(admin_address, certs=certs)
        finally:
            del os.environ["FEDTUNE_HOME"]
        run = subprocess.run(flwr_command("run", str(app), conn, "--stream"), env=flwr_env, capture_output=True, text=True, timeout=300)

        # Assert: the coordinator's side got a refusal, and nothing of the bundle ran on the site.
        assert result_path.exists(), f"the probe ServerApp wrote no result:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        result = json.loads(result_path.read_text())
        assert result["nodes"] == 1
        assert result["replies"] == [{"error": True, "code": 100, "reason": "untrusted-app site=site-a", "records": []}]
        markers = [marker_dir / "evil-code-ran", site_dir / "state" / "flower" / "evil-code-ran",
                   site_dir / "state" / "flower" / "tmp" / "evil-code-ran"]
        assert not any(m.exists() for m in markers), "the bundle's fedtune/client/app.py was imported on the site"
        installed = list((site_dir / "state" / "flower").rglob("probe_server.py"))
        assert installed == [], f"the refused bundle was installed on the site: {installed}"
        log = procs.log("site-a")
        assert "refused the app bundle" in log and "fedtune/client/app.py" in log, log[-3000:]
        assert "Cannot get processing duration" not in log, "the refusal's reply is accounted like any other"
        assert site.poll() is None, "the site daemon must keep running after a refusal"
    finally:
        procs.stop_all()
