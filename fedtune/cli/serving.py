"""Serving a model and watching runs: `fedtune serve` (HTTP inference) and `fedtune dashboard`."""

from __future__ import annotations

from pathlib import Path

import click

from fedtune.cli.root import main, offline_env


@main.command("serve")
@click.option("--adapter", required=True, type=click.Path(file_okay=False), help="Adapter folder (classification or causal-lm).")
@click.option("--base-model", type=click.Path(file_okay=False), help="Base model folder (default: the one the run used).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but loopback is warned about.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one, printed).")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Most texts or prompts per request, and per model call (waiting requests are merged up to it).")
@click.option("--max-body-bytes", type=click.IntRange(min=256), default=1 << 20, show_default=True,
              help="Largest request body; a larger one gets 413 before it is parsed.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads [one per core].")
def serve_cmd(adapter: str, base_model: str | None, host: str, port: int, max_batch: int, max_body_bytes: int,
              threads: int | None) -> None:
    """Serve an adapter over HTTP: GET /health, POST /predict or /generate, the API at /docs.

    Localhost only by default: the server has no TLS and no authentication. Stop it with Ctrl-C.
    """
    offline_env()
    from fedtune.loopback import exposure_warning
    from fedtune.serve import ServeSettings, serve

    warning = exposure_warning(host)
    if warning:
        click.secho(f"fedtune: WARNING: {warning}", err=True, fg="red", bold=True)
    settings = ServeSettings(max_batch=max_batch, max_body_bytes=max_body_bytes, threads=threads)
    serve(Path(adapter), base_model=base_model, host=host, port=port, settings=settings,
          announce=lambda line: click.echo(f"fedtune: {line}"))


@main.command("dashboard")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--site-config", type=click.Path(dir_okay=False, path_type=Path), help="A site's site.toml: adds a page of its privacy ledger.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (anything but the loopback shows the runs to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8050, show_default=True, help="Port (0: any free one, printed).")
@click.option("--refresh", type=click.IntRange(1, 3600), default=5, show_default=True, help="Seconds between reloads of a live run's page.")
def dashboard_cmd(run_dirs: tuple[Path, ...], site_config: Path | None, host: str, port: int, refresh: int) -> None:
    """A web dashboard of run directories (and a site's ledger): accuracy, epsilon per site, refusals, bytes, model card.

    Reads only the folders given and the site's ledger; a run still going reloads itself.
    """
    from fedtune.dashboard import serve

    serve(run_dirs, site_config=site_config, host=host, port=port, refresh_seconds=refresh, announce=click.echo)
