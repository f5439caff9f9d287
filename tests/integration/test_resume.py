"""A coordinator killed with SIGKILL in the middle of a run, then `fedtune simulate --resume`, on Flower's real
simulation engine through the CLI.

The first process is killed once round 2's checkpoint is complete and a site has charged its ledger for
round 3: the worst moment, a round whose privacy is spent and whose update is lost. Marked slow: two
starts of the engine (about two minutes on two cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROUNDS, TARGET = 4, 8.0


def _fedtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


def _ledgers(run_dir: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """Each simulated site's ledger file as JSON (written atomically, so a read never sees half of one)."""
    out = {}
    for path in sorted((run_dir / "sites").glob("*/privacy-ledger.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    return out


def _dp_sgd_rounds(ledger: dict) -> list[int]:  # type: ignore[type-arg]
    return [c["round"] for c in ledger["charges"] if c["kind"] == "dp-sgd"]


def test_a_coordinator_killed_after_a_site_was_charged_resumes_to_a_complete_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a 4-round simulation in its own process group (Ray's processes die with it)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(
            _fedtune("simulate", "--base-model", str(tiny_model_dir), "--max-length", "32", "--rounds", str(ROUNDS), "--sites", "2",
                     "--epsilon", str(TARGET), "--out", str(out)),
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and first.poll() is None:
                if (out / "checkpoints/round-2/complete.json").exists() and any(3 in _dp_sgd_rounds(x) for x in _ledgers(out).values()):
                    break
                time.sleep(0.01)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)

    # Assert the kill came where it was meant to: round 3 charged by a site, never checkpointed
    assert first.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert not (out / "checkpoints/round-3/complete.json").exists(), "killed too late: round 3 was already checkpointed"
    lost = {name for name, ledger in _ledgers(out).items() if 3 in _dp_sgd_rounds(ledger)}
    assert lost
    run_id = json.loads((out / "run.json").read_text())["run_id"]

    # Execute: resume through the CLI
    started = time.monotonic()
    resumed = subprocess.run(_fedtune("simulate", "--resume", str(out)), capture_output=True, text=True, timeout=400, env=env)
    print(f"resumed run took {time.monotonic() - started:.0f}s")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert f"resuming run {run_id} at round 3" in resumed.stdout

    # Assert: one metrics line per round, rounds 1..4, the summary of a whole run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and [s["site"] for s in summary["sites"]] == ["site-0", "site-1"]
    assert summary["validation"]["round"] == ROUNDS and summary["test"]["accuracy"] is not None
    assert all(s["rounds"] == ROUNDS for s in summary["sites"])
    (record,) = summary["resumes"]
    assert record["from_checkpoint"] == 2 and record["redone_round"] == 3 and record["changes"] == []
    identity = json.loads((out / "run.json").read_text())
    assert identity["run_id"] == run_id and identity["resumes"][0]["flower_run_id"] != run_id, "a new Flower run, the same identity"
    for name in ("adapter/adapter_model.safetensors", "privacy.json", "report.png", "checkpoints/round-4/complete.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "privacy.json").read_text())
    assert report["warnings"] == [] and report["resumes"][0]["redone_round"] == 3

    # Assert: privacy. Every charge under the one run id; a site charged for the lost round has it twice, re-planned
    # its noise for the two rounds left, and still ends within (and on) its target, as its ledger says
    from fedtune.client.ledger import PrivacyLedger

    by_site = {s["site"]: s for s in summary["sites"]}
    for name, ledger in _ledgers(out).items():
        assert {c["run"] for c in ledger["charges"]} == {run_id}
        expected = [1, 2, 3, 3, 4] if name in lost else [1, 2, 3, 4]
        assert _dp_sgd_rounds(ledger) == expected, name
        assert ledger["plans"][run_id]["charged_before"] == (3 if name in lost else 0)
        spent = PrivacyLedger(out / "sites" / name).summary(delta=by_site[name]["delta"]).max_epsilon
        assert spent == pytest.approx(by_site[name]["epsilon"]) and spent <= TARGET + 1e-9
        assert spent == pytest.approx(TARGET, rel=0.01), "re-planned to land on the target, not past it and not far below"

    # Assert: the final adapter loads with plain PEFT
    from peft import PeftModel

    from fedtune.common.model import load_classifier

    pooling = json.loads((out / "adapter" / "fedtune.json").read_text())["pooling"]
    PeftModel.from_pretrained(load_classifier(tiny_model_dir, len(summary["labels"]), pooling=pooling), str(out / "adapter"))

    # Assert: the finished run is not resumed again (one line, no traceback)
    again = subprocess.run(_fedtune("simulate", "--resume", str(out)), capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 2 and "finished all 4 rounds" in again.stderr and "Traceback" not in again.stderr
