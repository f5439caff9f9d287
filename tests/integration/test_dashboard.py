"""`fedtune dashboard` as a real process on 127.0.0.1, over plain HTTP and in headless Chromium.

Prepare: two run directories written by the coordinator's own writer (`RunRecorder`, the model
card writer): a finished run of 3 sites and 4 rounds in which site-c refused round 3 with
``budget-exhausted``, and a live run (no summary.json) of 2 rounds so far; a site.toml whose ledger
holds real charges (`PrivacyLedger.charge`) and whose data file does not exist (the dashboard must
never read it). Execute: `python -m fedtune.cli dashboard ...` on a free port. Assert: what the pages
show, read from the DOM (ids and data attributes), against the values written; expected epsilons
from Google's dp-accounting; a live run's page picks up a new round by itself.

The browser test uses Debian's chromium and chromedriver (`apt-get install -y chromium
chromium-driver`; `make install` does it when it can) and Selenium from the dev extra; it skips,
saying which is missing, when they are not there. Its screenshot goes to the test's tmp_path; the
README's docs/img/dashboard.png is refreshed only on request:

    FEDTUNE_WRITE_SCREENSHOT=1 .venv/bin/python -m pytest tests/integration/test_dashboard.py -k chromium
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from html import escape
from pathlib import Path
from typing import Iterator

import pytest

from fedtune.common.messages import PrivacyParams, TrainReply, ValidationStats
from fedtune.server.records import RunRecorder
from tests.integration.deployment import Processes

REPO = Path(__file__).resolve().parents[2]
README_SCREENSHOT = REPO / "docs" / "img" / "dashboard.png"
SITES = ("site-a", "site-b", "site-c")
BUDGET = 8.0
DELTA = 1e-5
EVIL_LABEL = "<script>document.title='pwned'</script>"  # a label is the trainer's text: it must reach the page as text


def _reply(site: str, epsilon: float, accuracy: float) -> TrainReply:
    privacy = PrivacyParams(dp=True, epsilon=epsilon, budget_epsilon=BUDGET, delta=DELTA, noise_multiplier=1.1,
                            clip_norm=1.0, sample_rate=0.5, steps=4)
    validation = ValidationStats(mode="dp", examples=40.0, loss=0.5, accuracy=accuracy, noise_std=0.1)
    return TrainReply(site=site, weight=120, privacy=privacy, validation=validation)


def _write_round(recorder: RunRecorder, r: int, *, refused: str | None = None, lm: bool = False) -> None:
    """One round as the round loop writes it: the sites' replies into their records, then the line (``lm``: a causal LM's)."""
    replied = [s for s in SITES if s != refused]
    for i, s in enumerate(replied):
        recorder.site(s).update(r, _reply(s, epsilon=0.9 * r + 0.3 * i, accuracy=0.5 + 0.05 * r))
    missing = [{"site": refused, "reason": "refused", "code": "budget-exhausted"}] if refused else []
    recorder.add_round({
        "round": r, "sites_sampled": len(SITES), "sites_replied": len(replied),
        "sites_rejected": [{"site": refused, "reason": "refused: budget-exhausted", "code": "budget-exhausted"}] if refused else [],
        "sites_missing": missing, "validated_round": r - 1, "loss": 0.5, "accuracy": None if lm else 0.5 + 0.05 * r, "macro_f1": None,
        "test_accuracy": None if lm else 0.58 + 0.04 * r, "test_perplexity": 20.0 - r if lm else None,
        "epsilon_by_site": {s: recorder.site(s).epsilon for s in replied}, "max_epsilon": max(recorder.site(s).epsilon for s in replied),
        "bytes_up": 100_000 * len(replied), "bytes_down": 100_000 * len(SITES), "seconds": 1.5,
    })


def _config(run_dir: Path, rounds: int) -> None:
    (run_dir / "config.toml").write_text(f"[privacy]\nenabled = true\ntarget_epsilon = {BUDGET}\n\n[federation]\nrounds = {rounds}\n")


def _finish(recorder: RunRecorder, rounds: int) -> None:
    from fedtune.server.report import write_model_card

    recorder.write_summary({"rounds": rounds, "task": "sequence-classification", "base_model": "tiny-bert", "dp": True,
                            "labels": ["cardiology", EVIL_LABEL],
                            "privacy": {"level": "sample-level DP-SGD at each site", "target_epsilon": BUDGET, "delta": DELTA,
                                        "accountant": "rdp"},
                            "test": {"accuracy": 0.75, "macro_f1": 0.7}, "validation": None, "bytes_up": 1, "bytes_down": 1,
                            "seconds": 6.0, "max_epsilon": max(s.epsilon for s in recorder.sites.values())})
    (recorder.run_dir / "adapter").mkdir(exist_ok=True)
    write_model_card(recorder.run_dir)


CHARGES = (("cohort-a", 1, 3.0, 5), ("cohort-a", 2, 3.0, 5), ("cohort-b", 4, 3.0, 3))  # (cohort, round, z, steps), q = 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.accounting import Segment

    base = tmp_path_factory.mktemp("dashboard")
    finished, live, growing = base / "finished-run", base / "live-run", base / "growing-run"
    for d in (finished, live, growing):
        d.mkdir()
    rec = RunRecorder(finished)
    _config(finished, 4)
    for r in range(1, 5):
        _write_round(rec, r, refused="site-c" if r == 3 else None)
    _finish(rec, 4)
    live_rec = RunRecorder(live)
    _config(live, 5)
    for r in (1, 2):
        _write_round(live_rec, r)
    _config(growing, 2)
    _write_round(RunRecorder(growing), 1)  # the browser test adds round 2 while the page is open
    lm_run = base / "lm-run"
    lm_run.mkdir()
    lm_rec = RunRecorder(lm_run)
    _config(lm_run, 2)
    for r in (1, 2):
        _write_round(lm_rec, r, lm=True)
    lm_rec.write_summary({"rounds": 2, "task": "causal-lm", "dp": True, "base": {"perplexity": 25.0}})
    # The site's own ledger: real charges, two cohorts of records that share nothing.
    site_dir = base / "site"
    ledger = PrivacyLedger(site_dir / "state")
    cohorts = {"cohort-a": [f"a{i}" for i in range(10)], "cohort-b": [f"b{i}" for i in range(4)]}
    for cohort, rnd, z, steps in CHARGES:
        ledger.charge(cohorts[cohort], run="finished-run", round=rnd, segment=Segment(sample_rate=1.0, noise_multiplier=z, steps=steps),
                      clip_norm=1.0, delta=DELTA, budget_epsilon=BUDGET)
    toml = site_dir / "site.toml"
    toml.write_text('[site]\nname = "site-c"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\nstate_dir = "state"\n\n'
                    f'[data]\npath = "no-such-data.csv"\n\n[privacy]\nbudget_epsilon = {BUDGET}\ndelta = {DELTA}\n')
    return {"finished": finished, "live": live, "growing": growing, "lm": lm_run, "site": toml}


@pytest.fixture(scope="module")
def dashboard(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    procs = Processes(tmp_path_factory.mktemp("dashboard-log"))  # its own process group, always stopped
    # --port 0: any free port, which the dashboard prints once it accepts connections (as `fedtune serve` does).
    procs.start("dashboard", ["dashboard", str(runs["finished"]), str(runs["live"]), str(runs["growing"]), str(runs["lm"]),
                              "--site-config", str(runs["site"]), "--host", "127.0.0.1", "--port", "0", "--refresh", "1"],
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90  # the ledger's accountant imports torch/Opacus before the server listens
        while not (found := re.search(r"fedtune dashboard: (http://127\.0\.0\.1:(\d+))/ ", procs.log("dashboard"))):
            if procs.running["dashboard"].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dashboard did not start (exit {procs.running['dashboard'].poll()}):\n{procs.log('dashboard')}")
            time.sleep(0.3)
        url = found.group(1)
        assert int(found.group(2)) != 0
        urllib.request.urlopen(url + "/", timeout=10).read()  # printed once it accepts connections: answers at once
        yield url
    finally:
        procs.stop_all()


def _get(url: str, host: str | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def _epsilon(z: float, steps: int) -> float:
    """The independent accountant: Google's dp-accounting RDP (q = 1: a plain Gaussian mechanism composed)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), steps))
    return float(accountant.get_epsilon(DELTA))


def test_dashboard_routes_over_http(dashboard: str) -> None:
    status, index, headers = _get(dashboard + "/")
    assert status == 200 and 'data-runs="4"' in index
    assert "default-src 'none'" in headers["content-security-policy"]  # no script can run on any page
    status, page, _ = _get(dashboard + "/runs/0")
    assert status == 200 and 'id="rounds" data-rounds="4"' in page and 'data-sites="3"' in page
    assert '<meta http-equiv="refresh"' not in page  # finished: summary.json exists
    assert 'data-round="3" data-replied="2" data-refused="1" data-codes="budget-exhausted"' in page
    assert "<script" not in page.lower() and "&lt;script&gt;document.title" in page  # the card's label, escaped
    status, live, _ = _get(dashboard + "/runs/1")
    assert status == 200 and '<meta http-equiv="refresh" content="1">' in live and 'data-live="true"' in live
    _, lm, _ = _get(dashboard + "/runs/3")  # a causal LM: perplexity per round against the base model's
    assert "Global adapter perplexity" in lm and 'data-label="base model" data-y="25.0"' in lm and 'data-points="2"' in lm
    for bad in ("/runs/4", "/runs/-1", "/runs/1e0", "/runs/%2e%2e%2fetc%2fpasswd", "/runs/0x1", "/runs/%EF%BC%91"):
        assert _get(dashboard + bad)[0] == 404, bad
    assert _get(dashboard + "/", host="attacker.example")[0] == 400  # DNS rebinding: a foreign Host is refused
    status, site, _ = _get(dashboard + "/site")
    assert status == 200 and 'data-charges="3"' in site
    assert '<meta http-equiv="refresh" content="1">' in site  # runs 1 and 2 are live: new charges may come


def test_site_page_shows_each_charge_with_the_epsilon_of_the_records_it_touched(dashboard: str) -> None:
    import re

    _, site, _ = _get(dashboard + "/site")
    shown = [float(x) for x in re.findall(r'<tr data-charge="\d+"[^>]*>(?:<td[^>]*>[^<]*</td>){8}<td>([\d.]+)</td>', site)]
    # Cohort a's records after 1 and 2 charges; cohort b shares no record with a, so it starts from zero.
    expected = [_epsilon(3.0, 5), _epsilon(3.0, 10), _epsilon(3.0, 3)]
    assert shown == pytest.approx(expected, abs=1.5e-3)  # the page shows 3 decimals
    budget = re.search(r'data-spent="([^"]+)" data-left="([^"]+)"', site)
    assert budget is not None, "the budget paragraph has no data-spent/data-left"
    spent, left = float(budget.group(1)), float(budget.group(2))
    assert spent == pytest.approx(_epsilon(3.0, 10), rel=1e-9) and left == pytest.approx(BUDGET - spent, rel=1e-9)
    assert 'id="chart-ledger"' in site and '<g class="series" data-name="dp-sgd" data-points="3">' in site
    assert 'data-refusals="1"' in site and "finished-run round 3: refused budget-exhausted" in site


def test_site_page_is_absent_without_a_site_config(runs: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    from fedtune.dashboard import create_app

    # host 0.0.0.0: the loopback Host check is off, so the test client's "testserver" host is served.
    with TestClient(create_app([runs["finished"]], host="0.0.0.0")) as client:
        assert client.get("/site").status_code == 404
        assert client.get("/runs/1").status_code == 404  # one run given: index 1 is out of the list


def test_card_markdown_is_escaped_in_every_block_and_links_stay_text() -> None:
    from fedtune.dashboard_svg import render_markdown

    evil = "<img src=x onerror=alert(1)>"
    card = (f"---\nbase_model: {evil}\n---\n# Title {evil}\n\nText **bold** {evil} [click](javascript:alert(1))\n\n"
            f"| a | b |\n|---|---:|\n| {evil} | `{evil}` |\n\n- item {evil}\n1. first\n\n```python\n{evil}\n```\n")
    html = render_markdown(card)
    assert "<img" not in html and "<a " not in html and "href" not in html
    assert html.count("&lt;img src=x onerror=alert(1)&gt;") == 7  # front matter, heading, text, 2 cells, list, code
    assert "<strong>bold</strong>" in html and "<table" in html and "<ol><li>first</li></ol>" in html


def test_a_round_line_still_being_written_is_skipped(tmp_path: Path) -> None:
    from fedtune.dashboard_data import read_run

    recorder = RunRecorder(tmp_path)
    _write_round(recorder, 1)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"round": 2, "sites_sam')  # a live run's next line, caught half-written
    run = read_run(tmp_path)
    assert [r.round for r in run.rounds] == [1] and not run.finished and run.sites == SITES


def _round_line(r: int, **changes: object) -> bytes:
    line = {"round": r, "sites_sampled": 3, "sites_replied": 3, "sites_missing": [], "validated_round": r - 1, "accuracy": 0.5,
            "test_accuracy": 0.6, "test_perplexity": None, "epsilon_by_site": {"site-a": 0.5 * r}, "bytes_up": 10, "bytes_down": 10,
            "seconds": 1.0, **changes}
    return (json.dumps(line) + "\n").encode()


# (metrics.jsonl, rounds shown, what the page must name); every other line is a whole round line.
HOSTILE_METRICS = {
    "torn line in the middle": (_round_line(1) + b'{"round": 2, "sit\n' + _round_line(3), 2, "line 2 is not a round"),
    "array line": (_round_line(1) + b"[1, 2]\n" + _round_line(3), 2, "line 2 is not a round"),
    "string, null and number lines": (b'"text"\nnull\n7\n' + _round_line(4), 1, "lines 1, 2, 3 are not a round"),
    "object without a round": (_round_line(1) + b'{"x": 1}\n' + _round_line(3), 2, "line 2 is not a round"),
    "round not a whole number": (b'{"round": "2"}\n{"round": true}\n{"round": 2.5}\n' + _round_line(4), 1, "lines 1, 2, 3"),
    "bytes that are not UTF-8": (_round_line(1) + b"\xff\xfe\x00garbage\n" + _round_line(3), 2, "line 2 is not a round"),
    "sites_sampled a string": (_round_line(1, sites_sampled="many") + _round_line(2), 1, "round 1: sites_sampled is \"many\""),
    "epsilon_by_site a list": (_round_line(1, epsilon_by_site=[1]) + _round_line(2), 1, "epsilon_by_site is [1], not an object"),
    "epsilon a string": (_round_line(1, epsilon_by_site={"a": "x"}) + _round_line(2), 1, 'epsilon_by_site["a"] is "x"'),
    "sites_missing a string": (_round_line(1, sites_missing="site-a") + _round_line(2), 1, "not a list"),
    "accuracy a string": (_round_line(1) + _round_line(2, accuracy="high"), 1, 'round 2: accuracy is "high"'),
    "non-finite seconds": (_round_line(1) + _round_line(2).replace(b'"seconds": 1.0', b'"seconds": Infinity'), 1, "seconds is inf"),
    "torn last line (a live run)": (_round_line(1) + b'{"round": 2, "sites_sam', 1, None),
}

HOSTILE_SUMMARIES = {
    "an array": ("[1, 2]", "summary.json holds list"),
    "a string": ('"done"', "summary.json holds str"),
    "not JSON": ('{"rounds": 2,', "summary.json cannot be read"),
    "sites a number": ('{"sites": 5, "dp": true}', "summary.json's sites is 5, not a list"),
    "site records of any type": ('{"sites": ["x", 3, null, {"site": "site-z", "budget_epsilon": "lots"}]}', None),
    "validation a string": ('{"validation": "good"}', "summary.json's validation is \"good\", not an object"),
    "validation of strings": ('{"validation": {"round": "2", "accuracy": "high"}}', None),
    "base an array": ('{"task": "causal-lm", "base": [1]}', "summary.json's base is [1], not an object"),
    "base perplexity NaN": ('{"task": "causal-lm", "base": {"perplexity": NaN}}', None),
    "task and dp of other types": ('{"task": 7, "dp": "yes", "max_epsilon": {}}', None),
}


def test_a_hostile_run_directory_gives_a_page_that_names_what_was_left_out(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from fedtune.dashboard import create_app

    # Prepare: one run directory per damage, a whole round line beside each damaged one.
    folders = []
    for i, (metrics, _, _) in enumerate(HOSTILE_METRICS.values()):
        folders.append(tmp_path / f"metrics-{i}")
        folders[-1].mkdir()
        (folders[-1] / "metrics.jsonl").write_bytes(metrics)
    for i, (summary, _) in enumerate(HOSTILE_SUMMARIES.values()):
        folders.append(tmp_path / f"summary-{i}")
        folders[-1].mkdir()
        (folders[-1] / "metrics.jsonl").write_bytes(_round_line(1) + _round_line(2))
        (folders[-1] / "summary.json").write_text(summary)
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.toml").write_text("[federation\nrounds = 'x'")
    (bad_config / "run.json").write_text("[]")
    folders.append(bad_config)

    # Execute: every page, in-process (host 0.0.0.0: the loopback Host check is off for the test client)
    with TestClient(create_app(folders, host="0.0.0.0")) as client:
        index = client.get("/")
        pages = [client.get(f"/runs/{i}") for i in range(len(folders))]

    # Assert: a page, never a server error, that names the damage and still shows the whole rounds
    assert index.status_code == 200 and f'data-runs="{len(folders)}"' in index.text
    for (name, (_, shown, named)), page in zip(HOSTILE_METRICS.items(), pages):
        assert page.status_code == 200, (name, page.text[-500:])
        assert f'id="rounds" data-rounds="{shown}"' in page.text, name
        if named:
            assert 'id="problems"' in page.text and escape(named) in page.text, (name, re.findall(r"<li>.*?</li>", page.text))
        else:
            assert 'id="problems"' not in page.text, name  # a live run's half-written line is no damage
    for (name, (_, named)), page in zip(HOSTILE_SUMMARIES.items(), pages[len(HOSTILE_METRICS):]):
        assert page.status_code == 200, (name, page.text[-500:])
        assert 'data-rounds="2"' in page.text and 'data-live="false"' in page.text, name  # summary.json exists: finished
        if named:
            assert escape(named) in page.text, (name, re.findall(r"<li>.*?</li>", page.text))
    last = pages[-1]
    assert last.status_code == 200 and "config.toml cannot be read" in last.text


def test_the_report_resume_and_the_dashboard_read_metrics_alike(tmp_path: Path) -> None:
    from fedtune.common.errors import ConfigError
    from fedtune.dashboard_data import read_rounds
    from fedtune.server.records import read_metrics
    from fedtune.server.resume import cut_metrics

    # A live run's half-written last line, with and without its newline: every reader skips it.
    for torn in (b'{"round": 3, "sit', b"\x00\x00\n", b"[3]\n"):
        (tmp_path / "metrics.jsonl").write_bytes(_round_line(1) + _round_line(2) + torn)
        assert [m["round"] for m in read_metrics(tmp_path)] == [r.round for r in read_rounds(tmp_path)] == [1, 2], torn
        assert [m["round"] for m in cut_metrics(tmp_path, upto=2, last_line=None).lines] == [1, 2], torn
    # Damage before the last line: the report and resume refuse it, naming the line; the dashboard names it and goes on.
    for bad in (b"[2]\n", b'{"round": 2, "sit\n', b'{"round": "2"}\n'):
        (tmp_path / "metrics.jsonl").write_bytes(_round_line(1) + bad + _round_line(3))
        with pytest.raises(ConfigError, match="line 2 is not a round's JSON line"):
            read_metrics(tmp_path)
        with pytest.raises(ConfigError, match="line 2 is not a round's JSON line"):
            cut_metrics(tmp_path, upto=3, last_line=None)
        problems: list[str] = []
        assert [r.round for r in read_rounds(tmp_path, problems)] == [1, 3] and "line 2 is not a round" in problems[0], bad


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    """Checked before the dashboard starts, so that a machine without a browser skips at once."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(f"no system Chromium ({chromium or 'chromium missing'}) or chromedriver ({driver or 'chromedriver missing'}): "
                    "`apt-get install -y chromium chromium-driver`, then run this test again")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed: `pip install -e '.[dev]'`")
    return chromium, driver


def test_dashboard_in_headless_chromium(browser_paths: tuple[str, str], dashboard: str, runs: dict[str, Path],
                                       tmp_path: Path) -> None:
    chromium, driver_path = browser_paths
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser or driver online
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1480",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        browser.set_page_load_timeout(30)
        browser.get(dashboard + "/")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#runs tr[data-run]")) == 4

        browser.get(dashboard + "/runs/0")
        assert browser.find_element(By.ID, "rounds").get_attribute("data-rounds") == "4"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#rounds tr[data-round]")) == 4
        assert [e.get_attribute("data-site") for e in browser.find_elements(By.CSS_SELECTOR, "#sites li")] == list(SITES)
        chart = browser.find_element(By.ID, "chart-epsilon")
        lines = {g.get_attribute("data-name"): int(g.get_attribute("data-points") or -1) for g in chart.find_elements(By.CSS_SELECTOR, "g.series")}
        assert lines == {"site-a": 4, "site-b": 4, "site-c": 3}  # site-c refused round 3: no epsilon for it there
        assert [float(g.get_attribute("data-y") or "nan") for g in chart.find_elements(By.CSS_SELECTOR, "line.guide")] == [BUDGET]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-sites g.bar")) == 4
        assert browser.title.startswith("run 0")  # the card's <script> never ran (it would have set the title)
        assert EVIL_LABEL in browser.find_element(By.ID, "card").text  # shown as text
        # The README's image only on request (FEDTUNE_WRITE_SCREENSHOT=1): a test run leaves the working tree alone.
        shot = README_SCREENSHOT if os.environ.get("FEDTUNE_WRITE_SCREENSHOT") == "1" else tmp_path / "dashboard.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0

        # Live: the page reloads itself; a round written now appears without the test navigating.
        browser.get(dashboard + "/runs/2")
        assert browser.find_element(By.ID, "status").get_attribute("data-live") == "true"
        assert browser.find_element(By.ID, "rounds").get_attribute("data-rounds") == "1"
        recorder = RunRecorder(runs["growing"])
        _write_round(recorder, 2)
        # A reload can land between a lookup and its read: those two errors only mean "look again".
        wait = WebDriverWait(browser, 15, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
        wait.until(lambda b: b.find_element(By.ID, "rounds").get_attribute("data-rounds") == "2")
        _finish(recorder, 2)
        wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("data-live") == "false")
    finally:
        browser.quit()
