"""The ``fedtune`` root group and what every command group shares.

Heavy libraries (torch, transformers, Flower) are imported inside commands, so ``--help`` is instant.
Errors print one line naming the fix and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from fedtune import __version__
from fedtune.common.errors import FedtuneError


class _Group(click.Group):
    """Turns fedtune's own errors into one line on stderr (traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FedtuneError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"fedtune: error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fedtune")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Federated, differentially private LoRA fine-tuning of pre-trained transformers.

    Sites train LoRA adapters on their own data with DP-SGD (Opacus); a Flower coordinator
    averages them. Only adapter tensors and scalar metrics ever leave a site.

    \b
    Researchers:   fedtune simulate (N sites on this machine), sweep (a grid of runs over seeds)
    Coordinators:  fedtune certs init, coordinator start, coordinator add-site, run, status, logs, stop
    Site operators: fedtune site init, site prepare, site check, site start, site ledger
    Auditors:      fedtune report RUN_DIR, audit RUN_DIR, audit-canary   (privacy report, attacks, one-run audit)
    Everyone:      fedtune evaluate / predict / generate / export / serve (use a trained adapter), dashboard RUN_DIR...
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def offline_env() -> None:
    import os

    from fedtune.common.environment import OFFLINE

    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)



def warn_insecure() -> None:
    click.secho(
        "WARNING: --insecure: no TLS, no node authentication and no admin certificate. Updates and metrics travel "
        "in plain text, anyone who can reach the ports can join, and anyone who can reach the admin port can start "
        "runs. Use only for local experiments.",
        fg="yellow", err=True,
    )

