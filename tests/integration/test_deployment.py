"""Real deployment on 127.0.0.1: coordinator (flower-superlink) and two site daemons (flower-supernode)
over TLS with node authentication, driven only through `fedtune` commands. Marked slow (a few minutes).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from .deployment import CoordinatorPorts, Processes, fedtune, free_port, start_coordinator, write_site_data

pytestmark = pytest.mark.slow

LABELS = "cardiology,gastroenterology,neurology,orthopedics,pulmonology"


class Deployment:
    def __init__(self, root: Path, tiny_model: Path) -> None:
        self.root = root
        self.tiny_model = tiny_model
        self.ports = CoordinatorPorts.free()
        self.port = self.ports.fleet
        self.address = self.ports.fleet_address  # what sites dial
        self.admin_address = self.ports.admin_address  # what `fedtune run`, status and add-site dial
        self.env = {**os.environ, "FEDTUNE_HOME": str(root / "fedtune-home")}
        self.certs = root / "certs"
        (root / "logs").mkdir()
        self.procs = Processes(root / "logs")

    def site_dir(self, name: str) -> Path:
        return self.root / name

    def init_site(self, name: str, rows: slice, *, budget: float = 8.0) -> Path:
        data = write_site_data(self.root / f"{name}.csv", rows)
        fedtune("site", "init", "--name", name, "--data", str(data), "--coordinator", self.address, "--ca", str(self.certs / "ca.crt"),
                "--out", str(self.site_dir(name)), "--budget-epsilon", str(budget), "--base-model", str(self.tiny_model), env=self.env)
        return self.site_dir(name) / "site.toml"

    def start_site(self, name: str) -> None:
        # Two sites share this machine's cores: one training thread each.
        self.procs.start(name, ["site", "start", "--config", str(self.site_dir(name) / "site.toml"), "--threads", "1",
                                "--runtime-port", str(free_port()), "--max-retries", "3"], self.env)

    def run(self, out: Path, *extra: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
        return fedtune("run", "--coordinator", self.admin_address, "--certs", str(self.certs), "--labels", LABELS,
                       "--base-model", str(self.tiny_model), "--max-length", "32", "--out", str(out), *extra,
                       env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Deployment]:
    dep = Deployment(tmp_path_factory.mktemp("deployment"), tiny_model_dir)
    try:
        fedtune("certs", "init", "--out", str(dep.certs), env=dep.env)
        start_coordinator(dep.procs, certs=dep.certs, state=dep.root / "coordinator-state", ports=dep.ports, env=dep.env)
        for name, rows in (("site-a", slice(0, 120)), ("site-b", slice(120, 240))):
            site_toml = dep.init_site(name, rows)
            if name == "site-b":  # one site accepts only the app bundle whose digest its operator approved
                digest = fedtune("app", "hash", env=dep.env).stdout.split()[0]
                with open(site_toml, "a", encoding="utf-8") as f:
                    f.write(f'\n[apps]\ntrusted_hashes = ["{digest}"]\n')
            fedtune("coordinator", "add-site", str(dep.site_dir(name) / "node-key.pub"), "--name", name,
                    "--coordinator", dep.admin_address, "--certs", str(dep.certs), env=dep.env)
            dep.start_site(name)
        yield dep
    finally:
        dep.procs.stop_all()


@pytest.fixture(scope="module")
def first_run(deployment: Deployment) -> Path:
    out = deployment.root / "run-1"
    deployment.run(out, "--rounds", "2", "--epsilon", "3")
    return out


def test_site_check_passes_every_check(deployment: Deployment) -> None:
    result = fedtune("site", "check", "--config", str(deployment.site_dir("site-a") / "site.toml"), env=deployment.env)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 6 and all(line.startswith("ok") for line in lines), result.stdout
    assert "statistics released: none" in result.stdout, "the default policy is shown"
    assert "TLS" in result.stdout


def test_federated_run_writes_the_complete_run_directory(first_run: Path) -> None:
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoints/round-1", "checkpoints/round-2",
                 "metrics.jsonl", "summary.json", "config.toml", "report.png"):
        assert (first_run / name).exists(), name
    assert len((first_run / "metrics.jsonl").read_text().splitlines()) == 2


def test_adapter_from_deployment_loads_with_peft(first_run: Path, deployment: Deployment) -> None:
    from peft import PeftModel

    from fedtune.common.model import load_classifier

    pooling = json.loads((first_run / "adapter" / "fedtune.json").read_text())["pooling"]
    base = load_classifier(deployment.tiny_model, 5, pooling=pooling)
    model = PeftModel.from_pretrained(base, str(first_run / "adapter"))
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_epsilon_per_site_is_in_the_summary_and_in_each_site_ledger(first_run: Path, deployment: Deployment) -> None:
    from fedtune.client.ledger import PrivacyLedger

    summary = json.loads((first_run / "summary.json").read_text())
    assert summary["dp"] is True
    sites = {s["site"]: s for s in summary["sites"]}
    assert set(sites) == {"site-a", "site-b"}
    for name, site in sites.items():
        assert 0 < site["epsilon"] <= 3.0
        ledger = PrivacyLedger(deployment.site_dir(name) / "state")
        assert ledger.summary(delta=site["delta"]).max_epsilon == pytest.approx(site["epsilon"])
        assert site["statistics"] == "none", "the default policy releases no statistics"


def test_ledger_survives_a_daemon_restart(first_run: Path, deployment: Deployment) -> None:
    from fedtune.client.ledger import PrivacyLedger

    ledger = PrivacyLedger(deployment.site_dir("site-a") / "state")
    before = ledger.summary(delta=1e-5).max_epsilon
    deployment.procs.stop("site-a")
    deployment.start_site("site-a")

    out = deployment.root / "run-2"
    deployment.run(out, "--rounds", "1", "--epsilon", "5")

    charges = ledger.charges()
    assert len({c.run for c in charges}) == 2, "both runs are on the same ledger"
    after = ledger.summary(delta=1e-5).max_epsilon
    assert before < after <= 5.0 + 1e-9
    summary = {s["site"]: s for s in json.loads((out / "summary.json").read_text())["sites"]}
    assert summary["site-a"]["epsilon"] == pytest.approx(after), "the second run reports the lifetime epsilon, not a restart at zero"


def test_site_whose_key_is_not_registered_is_refused(deployment: Deployment) -> None:
    deployment.init_site("site-unregistered", slice(240, 300))
    proc = deployment.procs.start("site-unregistered", ["site", "start", "--config", str(deployment.site_dir("site-unregistered") / "site.toml"),
                                                        "--runtime-port", str(free_port()), "--max-retries", "1"], deployment.env)
    assert proc.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in deployment.procs.log("site-unregistered")
    deployment.procs.stop("site-unregistered")


def test_client_without_the_ca_cannot_connect(deployment: Deployment) -> None:
    context = ssl.create_default_context()  # the system's CAs, not the consortium's
    with socket.create_connection(("127.0.0.1", deployment.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(sock, server_hostname="127.0.0.1")


def test_plain_text_connection_is_refused(deployment: Deployment) -> None:
    with socket.create_connection(("127.0.0.1", deployment.port), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            reply = sock.recv(1024)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert not reply.startswith(b"HTTP/"), f"a plain-text request got an HTTP answer: {reply[:80]!r}"


def test_sites_refuse_a_run_whose_labels_do_not_match_their_data(deployment: Deployment) -> None:
    out = deployment.root / "run-wrong-labels"
    result = fedtune("run", "--coordinator", deployment.admin_address, "--certs", str(deployment.certs), "--labels", "cardiology,oncology",
                     "--base-model", str(deployment.tiny_model), "--rounds", "1", "--out", str(out), env=deployment.env, timeout=420,
                     check=False)
    # No usable update: the round fails by name (federation.min_sites 2) and `fedtune run` exits non-zero with the reason.
    assert result.returncode != 0, result.stdout[-2000:]
    error = next(line for line in result.stderr.splitlines() if line.startswith("fedtune: error:"))
    assert "round 1: 0 of 2 sampled sites sent a usable update" in error, error
    assert "site-a: refused labels-mismatch" in error and "site-b: refused labels-mismatch" in error, error
    # A code, never the site's labels, a row number or its file's path.
    assert not any(leak in error for leak in ("gastroenterology", "row", ".csv")), error
    assert not (out / "summary.json").exists() and not (out / "metrics.jsonl").exists(), "a failed round leaves no line"


def test_status_lists_the_runs(first_run: Path, deployment: Deployment) -> None:
    result = fedtune("status", "--coordinator", deployment.admin_address, "--certs", str(deployment.certs), env=deployment.env)
    assert "finished" in result.stdout.lower()


def test_secure_aggregation_runs_across_real_site_daemons(deployment: Deployment) -> None:
    """SecAgg+ over TLS: four protocol exchanges per round through the SuperLink, context kept by each SuperNode."""
    out = deployment.root / "run-secure"
    result = deployment.run(out, "--rounds", "1", "--epsilon", "8", "--secure-agg")

    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["secure_agg"]["protocol"] == "SecAgg+", result.stdout
    assert line["sites_replied"] == 2 and not line["sites_rejected"]
    assert set(line["epsilon_by_site"]) == {"site-a", "site-b"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"] is not None
    assert "secure aggregation" in (out / "adapter" / "README.md").read_text().lower()


def _write_lm_rows(path: Path, rows: list[tuple[str, str]], prompt: str, response: str) -> Path:
    path.write_text("".join(json.dumps({prompt: p, response: r}) + "\n" for p, r in rows), encoding="utf-8")
    return path


def test_a_causal_lm_run_trains_on_generative_sites_while_classification_sites_refuse_it(deployment: Deployment) -> None:
    """Last in this module: it adds two causal-lm site daemons (tiny Llama, their own column names),
    and the two classification sites, still connected, must refuse the run by their policy."""
    import re
    import time

    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.causal_lm import load_lm_table
    from fedtune.common.sitedata import demo_data_path
    from tests.unit.test_causal_lm_run import save_tiny_llama

    root = deployment.root
    convs = load_lm_table(demo_data_path("clinical_summaries")).conversations
    pairs = [(c[0].content, c[-1].content) for c in convs]
    model = save_tiny_llama(root / "tiny-llama", [t for pair in pairs for t in pair])
    lm_sites = {"lm-a": pairs[:40], "lm-b": pairs[40:80]}
    classification_charges = {name: len(PrivacyLedger(deployment.site_dir(name) / "state").charges()) for name in ("site-a", "site-b")}
    try:
        for name, rows in lm_sites.items():
            data = _write_lm_rows(root / f"{name}.jsonl", rows, "note", "summary")  # the site's own column names
            fedtune("site", "init", "--name", name, "--task", "causal-lm", "--prompt-column", "note", "--response-column", "summary",
                    "--data", str(data), "--coordinator", deployment.address, "--ca", str(deployment.certs / "ca.crt"),
                    "--out", str(deployment.site_dir(name)), "--base-model", str(model), env=deployment.env)
            fedtune("coordinator", "add-site", str(deployment.site_dir(name) / "node-key.pub"), "--name", name,
                    "--coordinator", deployment.admin_address, "--certs", str(deployment.certs), env=deployment.env)
            deployment.start_site(name)
        deadline = time.monotonic() + 180
        while not all(re.search(r"SuperNode ID: \d+", deployment.procs.log(n)) for n in lm_sites):  # both joined: 4 sites connected
            assert time.monotonic() < deadline, "the causal-lm sites did not connect:\n" + deployment.procs.log("lm-a")[-2000:]
            time.sleep(0.5)
        # The coordinator's own held-out file (prompt/response: the run's column names), on its machine.
        test_file = _write_lm_rows(root / "coordinator-test.jsonl", pairs[80:92], "prompt", "response")
        out = root / "run-causal-lm"
        fedtune("run", "--coordinator", deployment.admin_address, "--certs", str(deployment.certs), "--task", "causal-lm",
                "--base-model", str(model), "--data", str(test_file), "--max-length", "96", "--rounds", "1", "--epsilon", "3",
                "--min-sites", "2", "--fraction-evaluate", "0", "--out", str(out), env=deployment.env, timeout=420)
    finally:
        for name in lm_sites:
            if name in deployment.procs.running:
                deployment.procs.stop(name)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["dp"] is True
    assert 1.0 < summary["test"]["perplexity"] < float("inf") and 1.0 < summary["base"]["perplexity"] < float("inf")
    generations = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert generations and {g["prompt"] for g in generations} <= {p for p, _ in pairs[80:92]}, "held-out prompts only"
    sites = {s["site"]: s for s in summary["sites"]}
    assert set(sites) == set(lm_sites)
    for name, site in sites.items():
        charges = [c for c in PrivacyLedger(deployment.site_dir(name) / "state").charges() if c.kind == "dp-sgd"]
        assert charges and 0 < site["epsilon"] <= 3.0
        assert PrivacyLedger(deployment.site_dir(name) / "state").summary(delta=site["delta"]).max_epsilon == pytest.approx(site["epsilon"])
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["sites_replied"] == 2
    refused = {r["site"]: r["code"] for r in line["sites_rejected"]}
    assert refused == {"site-a": "policy:task", "site-b": "policy:task"}, line["sites_rejected"]
    for name, before in classification_charges.items():
        assert len(PrivacyLedger(deployment.site_dir(name) / "state").charges()) == before, f"{name} refused before any charge"
        assert "policy.allowed_tasks" in deployment.procs.log(name), "the refusing site's own log names the policy key"
