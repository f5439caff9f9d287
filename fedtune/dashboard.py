"""A read-only web dashboard of run directories and, for a site operator, of its privacy ledger.

``fedtune dashboard RUN_DIR... [--site-config site.toml]`` serves server-rendered HTML (FastAPI +
uvicorn, already installed as Flower's dependencies) with charts as inline SVG
(`fedtune.dashboard_svg`): no script, no build step, nothing fetched at run time. Pages:

    /                 the runs given on the command line
    /runs/{i}         run i: accuracy (or perplexity), epsilon per site against its budget, sites
                      sampled/replied/refused with refusal codes, bytes per round, the model card
    /site             with --site-config: every charge of the site's ledger, the budget left, and
                      the rounds of the given runs in which the site was refused; it reloads itself
                      while one of the given runs is live

It reads only the run directories it was given (metrics.jsonl, summary.json, config.toml, run.json,
the latest checkpoint's resume-state.json, adapter/README.md: `fedtune.dashboard_data`) and the
site's ledger: a URL names a run by its index in that list, so no path from a request reaches the
filesystem. A run without
summary.json is live: its page reloads itself every few seconds. A run directory whose files are
damaged or hostile (a torn line, a field of another type) gives a page that names what was left out,
never a server error (`fedtune.dashboard_data`). Loopback by default (127.0.0.1, localhost or ::1),
with the Host header checked there so that a web page cannot reach it through DNS rebinding;
``--port 0`` takes any free port and prints it, as `fedtune serve` does.
"""

from __future__ import annotations

import logging
import time
from html import escape
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Sequence

from fedtune.common.errors import ConfigError
from fedtune.dashboard_data import LedgerView, RunView, read_ledger, read_run
from fedtune.dashboard_svg import Bars, Guide, Series, bar_chart, line_chart, render_markdown
from fedtune.loopback import exposure_warning, listen, refuse_foreign_hosts, run_app, url

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 5


# --------------------------------------------------------------------------------------- pages
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:1220px;color:#222;padding:0 1rem}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:1.6rem}table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right;font-size:.9rem}th{background:#f3f3f3}
td.text,th.text{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:1rem}.live{color:#a15c00;font-weight:bold}
.done{color:#176e2c}.warn{color:#a00}.card{border:1px solid #ddd;padding:0 1rem;max-width:1000px;overflow-x:auto}
pre{background:#f6f6f6;padding:.5rem;overflow-x:auto}nav a{margin-right:1rem}
"""


def _page(title: str, body: str, *, refresh: int | None = None, site_page: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    nav = '<nav><a href="/">runs</a>' + ('<a href="/site">site ledger</a>' if site_page else "") + "</nav>"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)} - fedtune</title>'
            f"<style>{_CSS}</style></head><body>{nav}{body}</body></html>")


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def _status(run: RunView, refresh: int) -> str:
    done = len(run.rounds)
    of = f" of {run.planned_rounds}" if run.planned_rounds else ""
    if run.finished:
        return f'<p id="status" class="done" data-live="false">Finished: {done}{of} rounds.</p>'
    return (f'<p id="status" class="live" data-live="true">Live: {done}{of} rounds so far, no summary.json yet; '
            f"this page reloads every {refresh} s.</p>")


def _problems(run: RunView) -> str:
    if not run.problems:
        return ""
    items = "".join(f"<li>{escape(p)}</li>" for p in run.problems)
    return (f'<div id="problems" class="warn" data-problems="{len(run.problems)}"><p>Some of this run\'s files are not what the '
            f"coordinator writes; what could not be read is left out of this page:</p><ul>{items}</ul></div>")


def index_page(runs: Sequence[RunView], *, refresh: int, site_page: bool) -> str:
    rows = []
    for i, run in enumerate(runs):
        eps = max((e for r in run.rounds for e in r.epsilon_by_site.values()), default=None)
        last = run.rounds[-1] if run.rounds else None
        quality = (f"perplexity {_f(last.test_perplexity, '.2f')}" if run.causal_lm else f"test accuracy {_f(last.test_accuracy)}") if last else "-"
        state = "finished" if run.finished else "live"
        shown = state + (f' <span class="warn">({len(run.problems)} unreadable, see its page)</span>' if run.problems else "")
        rows.append(f'<tr data-run="{i}" data-state="{state}" data-problems="{len(run.problems)}"><td>{i}</td><td class="text">'
                    f'<a href="/runs/{i}">{escape(run.path.name)}</a></td><td class="text">{shown}</td><td>{len(run.rounds)}'
                    f"{'/' + str(run.planned_rounds) if run.planned_rounds else ''}</td><td>{len(run.sites)}</td>"
                    f"<td>{_f(eps) if run.dp else 'no DP'}</td><td class=\"text\">{quality}</td></tr>")
    body = (f"<h1>fedtune runs</h1><table id=\"runs\" data-runs=\"{len(runs)}\"><tr><th>#</th><th class=\"text\">run</th>"
            "<th class=\"text\">state</th><th>rounds</th><th>sites</th><th>max epsilon</th><th class=\"text\">last round</th></tr>"
            + "".join(rows) + "</table>")
    live = any(not r.finished for r in runs)
    return _page("runs", body, refresh=refresh if live else None, site_page=site_page)


def _quality_chart(run: RunView) -> str:
    if run.causal_lm:
        series = [Series(name="held-out test", points=tuple((r.round, r.test_perplexity) for r in run.rounds if r.test_perplexity is not None))]
        guides = [Guide(label="base model", y=run.base_perplexity)] if run.base_perplexity is not None else []
        return line_chart(chart_id="chart-quality", title="Global adapter perplexity", x_label="after round",
                          y_label="perplexity", series=series, guides=guides)
    val = [(float(r.validated_round), r.accuracy) for r in run.rounds if r.validated_round is not None and r.accuracy is not None]
    if run.final_validation is not None:
        val.append((float(run.final_validation[0]), run.final_validation[1]))
    series = [s for s in (Series(name="site validation", points=tuple(val)),
                          Series(name="held-out test", points=tuple((r.round, r.test_accuracy) for r in run.rounds if r.test_accuracy is not None)))
              if s.points]
    return line_chart(chart_id="chart-quality", title="Global adapter accuracy", x_label="after round", y_label="accuracy", series=series)


def run_page(index: int, run: RunView, *, refresh: int, site_page: bool) -> str:
    rounds = run.rounds
    budget = {s: run.budgets.get(s, run.target_epsilon) for s in run.sites}
    sites = "".join(f'<li data-site="{escape(s)}">{escape(s)}'
                    + (f" (budget epsilon {budget[s]:g}{'' if s in run.budgets else ', the run target'})" if run.dp and budget[s] else "")
                    + "</li>" for s in run.sites)
    if run.dp:
        series = [Series(name=s, points=tuple((r.round, r.epsilon_by_site[s]) for r in rounds if s in r.epsilon_by_site)) for s in run.sites]
        guides = sorted({Guide(label="budget", y=b) for b in budget.values() if b}, key=lambda g: g.y)
        eps_chart = line_chart(chart_id="chart-epsilon", title="Epsilon spent per site (cumulative) against its budget",
                               x_label="round", y_label="epsilon", series=series, guides=guides, y_min=0.0)
    else:
        eps_chart = '<p id="chart-epsilon" class="warn" data-series="0">Trained WITHOUT differential privacy.</p>'
    xs = [r.round for r in rounds]
    sites_chart = bar_chart(chart_id="chart-sites", title="Sites per round", x_label="round", y_label="sites", xs=xs, stacked=True,
                            bars=[Bars(name="replied", values=tuple(float(r.replied) for r in rounds)),
                                  Bars(name="refused or missing", values=tuple(float(len(r.refused)) for r in rounds))])
    bytes_chart = bar_chart(chart_id="chart-bytes", title="Bytes per round", x_label="round", y_label="MiB", xs=xs, stacked=False,
                            bars=[Bars(name="up (to coordinator)", values=tuple(r.bytes_up / 2**20 for r in rounds)),
                                  Bars(name="down", values=tuple(r.bytes_down / 2**20 for r in rounds))])
    metric = "test perplexity" if run.causal_lm else "validation / test accuracy"
    rows = []
    for r in rounds:
        refused = "; ".join(escape(f.text()) for f in r.refused) or "-"
        quality = _f(r.test_perplexity, ".2f") if run.causal_lm else f"{_f(r.accuracy)} / {_f(r.test_accuracy)}"
        eps = ", ".join(f"{escape(s)} {e:.3f}" for s, e in sorted(r.epsilon_by_site.items())) if run.dp else "no DP"
        codes = " ".join(escape(f.code) for f in r.refused if f.code)
        rows.append(f'<tr data-round="{r.round}" data-replied="{r.replied}" data-refused="{len(r.refused)}" data-codes="{codes}">'
                    f"<td>{r.round}</td><td>{r.sampled}</td><td>{r.replied}</td><td class=\"text\">{refused}</td><td>{quality}</td>"
                    f"<td class=\"text\">{eps}</td><td>{_bytes(r.bytes_up)}</td><td>{_bytes(r.bytes_down)}</td><td>{_f(r.seconds, '.1f')}</td></tr>")
    table = (f'<table id="rounds" data-rounds="{len(rounds)}"><tr><th>round</th><th>sampled</th><th>replied</th>'
             f'<th class="text">refused or missing (code)</th><th>{metric}</th><th class="text">epsilon per site</th>'
             "<th>bytes up</th><th>bytes down</th><th>seconds</th></tr>" + "".join(rows) + "</table>")
    card = (f'<div id="card" class="card">{render_markdown(run.card)}</div>' if run.card
            else '<p id="card">No model card yet (adapter/README.md is written when the run ends).</p>')
    facts = (f"<p>Folder <code>{escape(run.path.name)}</code>" + (f", run id <code>{escape(run.run_id)}</code>" if run.run_id else "")
             + f'; <span id="round-count" data-rounds="{len(rounds)}">{len(rounds)} rounds</span>, '
             f'<span id="site-count" data-sites="{len(run.sites)}">{len(run.sites)} sites</span>.</p>')
    body = (f"<h1>Run {index}: {escape(run.path.name)}</h1>{_status(run, refresh)}{_problems(run)}{facts}"
            f'<ul id="sites" data-sites="{len(run.sites)}">{sites}</ul>'
            f'<div class="charts">{_quality_chart(run)}{eps_chart}{sites_chart}{bytes_chart}</div>'
            f"<h2>Rounds</h2>{table}<h2>Model card</h2>{card}")
    return _page(f"run {index}", body, refresh=None if run.finished else refresh, site_page=site_page)


def ledger_page(view: LedgerView, *, refresh: int | None = None) -> str:
    """The site's ledger; ``refresh``: reload every so many seconds (while a run given to the dashboard is live)."""
    rows, summary = [], view.summary
    for i, row in enumerate(summary.charges):
        c, when = row.charge, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row.charge.time))
        rows.append(f'<tr data-charge="{i}" data-run="{escape(c.run)}" data-round="{c.round}"><td>{i + 1}</td>'
                    f'<td class="text">{escape(c.run)}</td><td>{c.round}</td><td class="text">{escape(c.kind)}</td>'
                    f"<td>{'all' if row.records is None else row.records}</td><td>{c.noise_multiplier:.4f}</td><td>{c.sample_rate:.4f}</td>"
                    f"<td>{c.steps}</td><td>{_f(row.epsilon_after)}</td><td class=\"text\">{when}</td></tr>")
    refusals = "".join(f'<li data-run="{escape(run)}" data-round="{rnd}">{escape(run)} round {rnd}: {escape(f.reason)}'
                       f"{' ' + escape(f.code) if f.code else ''}</li>" for run, rnd, f in view.refusals)
    kinds = sorted({row.charge.kind for row in summary.charges})
    body = (f"<h1>Site {escape(view.site)}: privacy ledger</h1>"
            f'<p id="budget" data-budget="{view.budget_epsilon!r}" data-spent="{summary.max_epsilon!r}" data-left="{view.left!r}">'
            f"Worst record: epsilon {summary.max_epsilon:.3f} spent of this site's budget {view.budget_epsilon:g} "
            f"(delta {summary.delta:g}); <strong>{view.left:.3f} left</strong>.</p>"
            f"<p>Ledger <code>{escape(str(summary.path))}</code>, over every record any charge named (the data file is not read). "
            "A charge is written before training, so privacy counts as spent once noise may be drawn.</p>"
            + line_chart(chart_id="chart-ledger", title="Epsilon of the worst record each charge touched, after it",
                         x_label="charge", y_label="epsilon", y_min=0.0, guides=[Guide(label="budget", y=view.budget_epsilon)],
                         # One line per kind: training and validation charges touch different records.
                         series=[Series(name=kind, points=tuple((i + 1, row.epsilon_after or 0.0) for i, row in enumerate(summary.charges)
                                                                if row.charge.kind == kind)) for kind in kinds])
            + f'<table id="charges" data-charges="{len(summary.charges)}"><tr><th>#</th><th class="text">run</th><th>round</th>'
            '<th class="text">kind</th><th>records</th><th>noise z</th><th>sample rate q</th><th>steps</th>'
            '<th>epsilon after (worst record)</th><th class="text">time</th></tr>' + "".join(rows) + "</table>"
            f"<h2>Refusals</h2><p>The ledger records charges only: a refused round is never charged, and its details are in "
            "the site daemon's log. Rounds of the runs given to the dashboard in which the coordinator recorded this site "
            f'as refused or missing:</p><ul id="refusals" data-refusals="{len(view.refusals)}">{refusals or "<li>none</li>"}</ul>')
    return _page(f"site {view.site}", body, refresh=refresh, site_page=True)


# ------------------------------------------------------------------------------------- serving
def _check_inputs(run_dirs: Sequence[Path], site_config: Path | None, refresh_seconds: int) -> tuple[Path, ...]:
    problems = [f"run directory {p} does not exist or is not a folder." for p in run_dirs if not Path(p).is_dir()]
    if not run_dirs:
        problems.append("give at least one run directory (a folder `fedtune simulate` or `fedtune run` wrote).")
    if site_config is not None and not Path(site_config).is_file():
        problems.append(f"--site-config {site_config} is not a file (the site's site.toml).")
    if not 1 <= refresh_seconds <= 3600:
        problems.append(f"the refresh interval must be 1..3600 seconds, got {refresh_seconds!r}.")
    if problems:
        raise ConfigError(problems)
    return tuple(Path(p) for p in run_dirs)


def create_app(run_dirs: Sequence[Path], *, site_config: Path | None = None, host: str = "127.0.0.1",
               refresh_seconds: int = REFRESH_SECONDS) -> FastAPI:
    """The dashboard's ASGI app over ``run_dirs`` (and the ledger of ``site_config``'s site).

    Every page is read from disk on each request, so a live run's new rounds appear on the next
    reload; the site's config and ledger too (a charge appears once written), and once more here,
    so that a bad one fails at start.

    Raises:
        ConfigError: a run directory or the site config is missing or invalid.
    """
    from fastapi import FastAPI, Request, Response
    from fastapi.responses import HTMLResponse

    runs = _check_inputs(run_dirs, site_config, refresh_seconds)
    if site_config is not None:
        read_ledger(site_config)  # fail now, and pay the accountant's imports before the first request
    app = FastAPI(title="fedtune dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    refuse_foreign_hosts(app, host)  # a page on another site cannot reach it by rebinding a DNS name to the loopback

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        # No scripts at all: a model card or a site name with markup could do nothing even if escaping failed.
        response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    def not_found(what: str) -> HTMLResponse:
        return HTMLResponse(_page("not found", f"<h1>Not found</h1><p>{escape(what)}</p>", site_page=site_config is not None), 404)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return index_page([read_run(p) for p in runs], refresh=refresh_seconds, site_page=site_config is not None)

    @app.get("/runs/{index}", response_class=HTMLResponse)
    def run(index: str) -> Any:
        # Only an index into the list given at start: nothing in the URL becomes a path.
        if not (index.isascii() and index.isdigit() and int(index) < len(runs)):
            return not_found(f"There is no run {index!r}: this dashboard shows runs 0 to {len(runs) - 1}.")
        i = int(index)
        return run_page(i, read_run(runs[i]), refresh=refresh_seconds, site_page=site_config is not None)

    @app.get("/site", response_class=HTMLResponse)
    def site() -> Any:
        if site_config is None:
            return not_found("No site ledger: start the dashboard with --site-config site.toml.")
        views = [read_run(p) for p in runs]
        # While a run is live its charges keep coming: the page reloads itself, as the run's page does.
        return ledger_page(read_ledger(site_config, views), refresh=refresh_seconds if any(not v.finished for v in views) else None)

    return app


def serve(run_dirs: Sequence[Path], *, site_config: Path | None = None, host: str = "127.0.0.1", port: int = 8050,
          refresh_seconds: int = REFRESH_SECONDS, announce: Callable[[str], None] = print) -> None:
    """Serve the dashboard until interrupted (uvicorn handles SIGINT/SIGTERM).

    ``announce`` gets one line once the server accepts connections, with its URL (the real port
    when ``port`` is 0), as `fedtune serve` does.
    """
    sock = listen(host, port)  # before the ledger's imports, so a port in use is one line at once
    try:
        app = create_app(run_dirs, site_config=site_config, host=host, refresh_seconds=refresh_seconds)
    except BaseException:
        sock.close()
        raise
    warning = exposure_warning(host)
    if warning:
        logger.warning("dashboard: %s It shows the runs and the site's ledger.", warning)
    line = (f"fedtune dashboard: {url(host, sock.getsockname()[1])}/ ({len(run_dirs)} run(s)"
            f"{', site ledger at /site' if site_config else ''}); Ctrl-C stops it")
    run_app(app, sock, on_started=lambda: announce(line), log_level="warning", graceful_seconds=None)
