"""`fedtune sweep`: a grid of simulations with means and 95% confidence intervals over seeds (fedtune/sweep.py)."""

from __future__ import annotations

from pathlib import Path

import click

from fedtune.cli.root import main, offline_env


@main.command()
@click.option("--config", "config_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Sweep file: a run config (as `simulate --config`) plus a [grid] table of lists, e.g. "
                   "privacy.target_epsilon = [1, 3, 8, \"none\"] and seed = [0, 1, 2].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="The sweep's folder: sweep.csv, the plots, runs/ and logs/ [runs/sweep-<config file name>]. "
                   "Run the same command again to finish a sweep: done runs are kept, half-finished ones redone.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs at a time (each is a `fedtune simulate` with its own Ray; on 2 cores keep 1).")
@click.option("--run-timeout", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Stop a run (recorded as 'timeout') after this many seconds; 0: no limit.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Start a failed run again up to this many times (e.g. Ray timing out at start-up on a busy machine).")
@click.option("--start-within", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Start no run later than this many seconds after the sweep began (the runs in progress finish; "
                   "the rest wait for the next invocation); 0: no limit.")
@click.option("--dry-run", is_flag=True, help="Check the sweep file and list the runs (done or to run); run nothing.")
@click.option("--report", is_flag=True,
              help="Write sweep.csv, the plots and the table from the runs done so far; run nothing.")
def sweep(config_file: Path, out: Path | None, jobs: int, run_timeout: float, retries: int, start_within: float,
          dry_run: bool, report: bool) -> None:
    """Run a grid of `fedtune simulate` runs: one CSV row per run, plots, and a table over seeds.

    Every grid key and value, and every cell of the grid, is checked (did-you-mean for a misspelt
    key) before anything runs. Each run is a subprocess: one that crashes is recorded in the CSV
    and the sweep goes on. Bands and intervals are 95% Student-t intervals of the mean over seeds.
    """
    offline_env()
    from fedtune.sweep import is_done, load_sweep, print_table, run_sweep, write_csv, write_markdown

    if dry_run and report:
        raise click.UsageError("--dry-run and --report each run nothing; give one of them.")

    out = out or Path("runs") / f"sweep-{config_file.stem}"
    plan = load_sweep(config_file, out=out)
    if dry_run:
        done = 0
        for cell in plan.cells:
            state = "done" if is_done(cell) else ("redo (half-finished)" if cell.run_dir.exists() else "to run")
            done += state == "done"
            click.echo(f"{state:<21} {cell.name}  " + " ".join(f"{k}={v}" for k, v in cell.values))
        click.echo(f"{len(plan.cells)} runs: {done} done, {len(plan.cells) - done} to run; results would go to {plan.csv_path}")
        return
    if report:
        rows = write_csv(plan)
    else:
        rows = run_sweep(plan, jobs=jobs, run_timeout=run_timeout or None, retries=retries,
                         start_within=start_within or None, echo=click.echo)
    from fedtune.sweep_plots import plot_sweep

    plots = plot_sweep(rows, plan.out)
    markdown = write_markdown(rows, plan.out)
    print_table(rows)
    failed = [r for r in rows if r.status in ("failed", "timeout")]
    pending = sum(r.status == "pending" for r in rows)
    click.echo(f"results: {plan.csv_path}\ntable: {markdown}" + "".join(f"\nplot: {p}" for p in plots)
               + (f"\n{pending} of {len(rows)} runs not run yet: run the sweep again to go on" if pending else ""))
    if failed:
        click.echo(f"{len(failed)} of {len(rows)} runs did not finish (status and error in the CSV, output in {plan.out / 'logs'}); "
                   "run the same command again to retry them.", err=True)
        raise SystemExit(1)
