"""The deployment soak test: a run that survives its sites and its coordinator dying under it.

A real coordinator and three real site daemons over TLS on 127.0.0.1 (tests/integration/deployment.py),
a tiny model, 10 short rounds. While the run goes on, one site daemon is killed and restarted twice
(once SIGKILL to the daemon alone, whose SuperNode then leaves the coordinator in order; once SIGKILL
to every process of the site, as a crash of its host, which leaves the coordinator holding its
session until two heartbeats are missed), and the coordinator is killed once (every process of it,
SIGKILL, right after the site's host crash) and the run continued with `fedtune run --resume RUN_DIR`.
Nobody acts on the sites: they rejoin by themselves, as the same Flower node.

Then the run is complete, each site's own ledger agrees with the summary's epsilon for it, and
every checkpoint is complete and loads. Marked slow; every wait is bounded and the test stops by
itself (a few minutes on two cores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .deployment import CoordinatorPorts, Processes, fedtune, free_port, start_coordinator, write_site_data

pytestmark = pytest.mark.slow

LABELS = "cardiology,gastroenterology,neurology,orthopedics,pulmonology"
ROUNDS = 10
# Generous: a site that dies mid-round is reported by the SuperLink (node unavailable) or the coordinator is
# down with it, so the deadline is never waited out here; rounds on a busy 2-core machine take up to ~20 s.
ROUND_TIMEOUT = 60.0
SOAK_SECONDS = 600  # the whole test, from the first daemon to the last check
SITES = {"site-a": slice(0, 120), "site-b": slice(120, 240), "site-c": slice(240, 360)}
VICTIM = "site-c"


class Soak:
    def __init__(self, root: Path, tiny_model: Path) -> None:
        self.root, self.tiny_model = root, tiny_model
        self.ports = CoordinatorPorts.free()
        self.env = {**os.environ, "FEDTUNE_HOME": str(root / "fedtune-home"), "PYTHONUNBUFFERED": "1"}
        self.certs = root / "certs"
        (root / "logs").mkdir()
        self.procs = Processes(root / "logs")
        self.out = root / "run"
        self.started = time.monotonic()
        self.events: list[str] = []

    def note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.1f}s {what}")

    def start_coordinator(self) -> None:
        start_coordinator(self.procs, certs=self.certs, state=self.root / "coordinator-state", ports=self.ports, env=self.env)

    def start_site(self, name: str) -> None:
        # No --max-retries: a site waits for its coordinator as long as it takes.
        self.procs.start(name, ["site", "start", "--config", str(self.root / name / "site.toml"), "--threads", "1",
                                "--runtime-port", str(free_port())], self.env)

    def submit(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "fedtune.cli", "run", "--coordinator", self.ports.admin_address, "--certs", str(self.certs), *args]
        with open(self.root / "logs" / log, "ab") as sink:
            return subprocess.Popen(cmd, env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

    def lines(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        out = []
        for text in path.read_text().splitlines() if path.exists() else []:
            try:
                out.append(json.loads(text))
            except ValueError:  # a line being appended
                pass
        return out

    def wait_for(self, what: str, done: Callable[[], bool], *, runner: subprocess.Popen[bytes] | None = None) -> None:
        while not done():
            if time.monotonic() - self.started > SOAK_SECONDS:
                raise AssertionError(f"soak test over {SOAK_SECONDS}s waiting for {what}; events: {self.events}")
            if runner is not None and runner.poll() is not None:
                raise AssertionError(f"the run ended (exit {runner.returncode}) before {what}; events: {self.events}\n"
                                     + (self.root / "logs" / "run-1.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        self.note(what)

    def replied_after(self, name: str, server_round: int) -> bool:
        return any(x["round"] > server_round and name in x["epsilon_by_site"] for x in self.lines())

    def last_round(self) -> int:
        return max((x["round"] for x in self.lines()), default=0)

    def node_ids(self, name: str) -> list[str]:
        """Every node id Flower's SuperNode announced in this site's log, one per start."""
        return re.findall(r"SuperNode ID: (\d+)", self.procs.log(name))


def test_a_run_survives_two_site_restarts_and_a_coordinator_crash(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.client.ledger import PrivacyLedger

    soak = Soak(tmp_path, tiny_model_dir)
    config = tmp_path / "soak.toml"
    config.write_text(
        f'[model]\nbase_model = "{tiny_model_dir}"\nmax_length = 16\n\n'
        f"[train]\nlocal_epochs = 0.5\nphysical_batch_size = 64\n\n"
        f"[federation]\nsites = 3\nmin_sites = 2\nrounds = {ROUNDS}\nround_timeout = {ROUND_TIMEOUT}\n"
        # One message per site and round: no validation exchange, so rounds stay short.
        "fraction_evaluate = 0.0\n"
    )
    try:
        # Prepare: the coordinator and three sites, each with its own data and node key.
        fedtune("certs", "init", "--out", str(soak.certs), env=soak.env)
        soak.start_coordinator()
        for name, rows in SITES.items():
            data = write_site_data(tmp_path / f"{name}.csv", rows)
            fedtune("site", "init", "--name", name, "--data", str(data), "--coordinator", soak.ports.fleet_address, "--ca",
                    str(soak.certs / "ca.crt"), "--out", str(tmp_path / name), "--base-model", str(tiny_model_dir), env=soak.env)
            fedtune("coordinator", "add-site", str(tmp_path / name / "node-key.pub"), "--name", name,
                    "--coordinator", soak.ports.admin_address, "--certs", str(soak.certs), env=soak.env)
            soak.start_site(name)
        soak.wait_for("every site connected", lambda: all(soak.node_ids(name) for name in SITES))
        first = soak.submit("--config", str(config), "--labels", LABELS, "--out", str(soak.out), log="run-1.log")

        # Execute: the victim's daemon is killed and restarted at once, then left alone.
        soak.wait_for("round 1 recorded", lambda: soak.last_round() >= 1, runner=first)
        soak.procs.kill(VICTIM)
        soak.start_site(VICTIM)
        killed_at = soak.last_round()
        soak.note(f"{VICTIM} daemon SIGKILLed and restarted after round {killed_at}")
        soak.wait_for(f"{VICTIM} rejoined after its daemon was killed", lambda: soak.replied_after(VICTIM, killed_at), runner=first)

        # The victim's host crashes (its daemon restarted at once), and so does the coordinator (every process
        # of it); the coordinator comes back on the same state and the run is resumed. The victim must wait
        # out the session the coordinator kept for it (two missed heartbeats): that wait overlaps the coordinator's.
        soak.procs.crash(VICTIM)
        soak.start_site(VICTIM)
        crashed_site_at = soak.last_round()
        soak.note(f"{VICTIM} host crashed and daemon restarted after round {crashed_site_at}")
        soak.procs.crash("coordinator")
        crashed_at = soak.last_round()
        soak.note(f"coordinator crashed after round {crashed_at}")
        assert first.wait(timeout=120) != 0, "fedtune run must not report success for a run whose coordinator died"
        soak.start_coordinator()
        # The operator resumes once every site is back: the victim when its old session has expired.
        soak.wait_for(f"{VICTIM} rejoined after its host crash", lambda: len(soak.node_ids(VICTIM)) >= 3)
        resumed = soak.submit("--resume", str(soak.out), log="run-2.log")
        soak.wait_for("the resumed run's first round", lambda: soak.last_round() > crashed_at, runner=resumed)
        soak.wait_for("the resumed run to finish", lambda: resumed.poll() is not None)
        elapsed = time.monotonic() - soak.started

        # Assert: the run finished, one line per round, and the victim rejoined as the same Flower node.
        assert resumed.returncode == 0, (tmp_path / "logs" / "run-2.log").read_text(errors="replace")[-3000:]
        lines = soak.lines()
        assert [x["round"] for x in lines] == list(range(1, ROUNDS + 1)), "no duplicate and no missing round"
        ids = soak.node_ids(VICTIM)
        assert len(ids) >= 3 and len(set(ids)) == 1, f"{VICTIM} rejoined under another node identity: {ids}"
        assert all(VICTIM in x["epsilon_by_site"] for x in lines[crashed_at:]), f"{VICTIM} took part in every resumed round"
        summary = json.loads((soak.out / "summary.json").read_text())
        assert summary["rounds"] == ROUNDS and {s["site"] for s in summary["sites"]} == set(SITES)
        identity = json.loads((soak.out / "run.json").read_text())
        assert len(identity["resumes"]) == 1 and identity["resumes"][0]["from_checkpoint"] == crashed_at

        # Each site's own ledger agrees with the summary: nothing it spent went unreported, nothing is counted twice.
        for site in summary["sites"]:
            ledger = PrivacyLedger(tmp_path / site["site"] / "state")
            assert ledger.summary(delta=site["delta"]).max_epsilon == pytest.approx(site["epsilon"], rel=1e-9), site["site"]
            assert 0 < site["epsilon"] <= 8.0 + 1e-9

        # Every checkpoint is complete (manifest, sizes, digests) and loads with PEFT.
        _check_checkpoints(soak.out, run_id=identity["run_id"], tiny_model=tiny_model_dir)
        print(f"\nsoak: {ROUNDS} rounds, 2 site restarts, 1 coordinator crash, {elapsed:.0f}s; events:\n  " + "\n  ".join(soak.events))
    finally:
        soak.procs.stop_all()


def _check_checkpoints(run_dir: Path, *, run_id: str, tiny_model: Path) -> None:
    from peft import PeftModel

    from fedtune.common.model import load_classifier
    from fedtune.server.resume import read_checkpoint

    folders = sorted((run_dir / "checkpoints").glob("round-*"), key=lambda p: int(p.name.removeprefix("round-")))
    assert [int(p.name.removeprefix("round-")) for p in folders] == list(range(1, ROUNDS + 1))
    pooling = json.loads((run_dir / "adapter" / "fedtune.json").read_text())["pooling"]
    for folder in folders:
        read_checkpoint(folder, server_round=int(folder.name.removeprefix("round-")), run_id=run_id)
        PeftModel.from_pretrained(load_classifier(tiny_model, len(LABELS.split(",")), pooling=pooling), str(folder))
