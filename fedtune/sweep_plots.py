"""The sweep's figures (matplotlib, Agg), written next to ``sweep.csv``.

Every point is the mean over the seeds of one setting and every band its 95% Student-t interval
(``fedtune.sweep.t_interval``); a setting with one finished seed has a point and no band.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.sweep import EPSILON_KEY, NO_DP, RunRow, Spread, primary_metric, t_interval

FILES = ("metric_vs_epsilon.png", "metric_by_round.png", "epsilon_by_round.png")


def labels(settings: Sequence[Sequence[tuple[str, str]]]) -> list[str]:
    """A legend label per setting naming only the keys whose values differ between the settings (a key
    that is the same on every line says nothing and only lengthens the legend)."""
    keys = [k for k, _ in settings[0]] if settings else []
    varying = [k for k in keys if len({dict(s).get(k) for s in settings}) > 1]
    return [", ".join(f"{k.rsplit('.', 1)[-1]}={dict(s)[k]}" for k in varying) or "all runs" for s in settings]


def _without(row: RunRow, *keys: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in row.setting if k not in keys)


def _band(ax: Any, xs: list[float], spreads: list[Spread], **style: Any) -> Any:
    line, = ax.plot(xs, [s.mean for s in spreads], marker="o", **style)
    banded = [(x, s) for x, s in zip(xs, spreads) if s.low is not None and s.high is not None]
    if banded:
        ax.fill_between([x for x, _ in banded], [s.low for _, s in banded], [s.high for _, s in banded],
                        color=line.get_color(), alpha=0.18, linewidth=0)
    return line


def plot_sweep(rows: Sequence[RunRow], out_dir: Path) -> list[Path]:
    """Write the three figures for the done runs in ``rows``; returns their paths (none without a done run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [r for r in rows if r.status == "done"]
    if not done:
        return []
    metric = primary_metric(done)
    name = metric.replace("test_", "test ")
    written = []

    # 1. The metric against epsilon: one line per setting of the other grid keys; no-DP as a dashed level.
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lines: dict[tuple[tuple[str, str], ...], list[RunRow]] = {}
    for row in done:
        lines.setdefault(_without(row, EPSILON_KEY, "seed"), []).append(row)
    epsilons: set[float] = set()
    # One colour per setting, its DP curve and its no-DP level alike (a no-DP-only setting, such as a
    # centralized reference, gets its own rather than the first curve's).
    for i, (group, label) in enumerate(zip(lines.values(), labels(list(lines)))):
        color = f"C{i % 10}"
        by_eps: dict[float, list[float]] = {}
        plain: list[float] = []
        for row in group:
            value = row.metric(metric)
            if value is None:
                continue
            eps = dict(row.setting).get(EPSILON_KEY)
            if eps == NO_DP:
                plain.append(value)
            else:  # a grid without epsilon: the run's own target, read from its max epsilon when there is one
                x = float(eps) if eps is not None else row.metric("max_epsilon")
                if x is not None:
                    by_eps.setdefault(x, []).append(value)
        if by_eps:
            xs = sorted(by_eps)
            epsilons.update(xs)
            _band(ax, xs, [t_interval(by_eps[x]) for x in xs], label=label, color=color)
        if plain:
            s = t_interval(plain)
            ax.axhline(s.mean, linestyle="--", linewidth=1.2, color=color, label=f"{label}, no DP" if by_eps else f"{label} (no DP)")
            if s.low is not None:
                ax.axhspan(s.low, s.high, color=color, alpha=0.10, linewidth=0)
    if len(epsilons) > 1 and min(epsilons) > 0:
        ax.set_xscale("log")
        ax.minorticks_off()  # label the swept epsilons only
        ax.set_xticks(sorted(epsilons), [f"{e:g}" for e in sorted(epsilons)])
    ax.set(xlabel="target epsilon per site", ylabel=name,
           title=f"{name} vs epsilon: mean over seeds, band: 95% t-interval")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / FILES[0])
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 2. and 3. Per round, one line per setting (every grid key but seed).
    settings: dict[tuple[tuple[str, str], ...], list[RunRow]] = {}
    for row in done:
        settings.setdefault(_without(row, "seed"), []).append(row)
    for file, field, ylabel in ((FILES[1], "metric", name), (FILES[2], "max_epsilon", "max epsilon over sites")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for group, label in zip(settings.values(), labels(list(settings))):
            by_round: dict[int, list[float]] = {}
            for row in group:
                for point in row.rounds:
                    value = getattr(point, field)
                    if value is not None:
                        by_round.setdefault(point.round, []).append(value)
            if by_round:
                xs = sorted(by_round)
                _band(ax, [float(x) for x in xs], [t_interval(by_round[x]) for x in xs], label=label)
        ax.set(xlabel="after round", ylabel=ylabel, title=f"{ylabel} per round: mean over seeds, band: 95% t-interval")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / file)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
