"""What the dashboard renders without templates: inline SVG charts and the model card's Markdown.

Charts are drawn in Python: no chart script, no CDN, nothing to download.

Every text that reaches the SVG (site names, labels) is escaped here; the charts carry ids and
``data-*`` attributes (series names, point counts) so that a browser test can read what is drawn.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from html import escape
from typing import Sequence

# Colour-blind-safe (Okabe-Ito), cycled for more series.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


@dataclass(frozen=True, kw_only=True)
class Series:
    """One line: ``points`` (x, y), x a round number."""

    name: str
    points: tuple[tuple[float, float], ...]
    dashed: bool = False


@dataclass(frozen=True, kw_only=True)
class Bars:
    """One bar series: a value per x (a round), in the order of the chart's ``xs``."""

    name: str
    values: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class Guide:
    """A horizontal reference line (a privacy budget, the base model's perplexity)."""

    label: str
    y: float


_W, _H = 560, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 150, 16, 40  # the right margin holds the legend


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    out = [round(start, 12)]
    while out[-1] < hi - step * 1e-9:  # the last tick is at or above hi: the top of every bar is on the scale
        out.append(round(out[-1] + step, 12))
    return out


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.2g}"
    return f"{v:g}" if float(v).is_integer() else f"{v:.3g}"


def _frame(chart_id: str, title: str, x_label: str, y_label: str, y_lo: float, y_hi: float, attrs: str) -> tuple[list[str], float, float]:
    """The SVG's opening, axes, grid and labels; returns the parts and the y range the ticks settled on."""
    ticks = _ticks(y_lo, y_hi)
    y_lo, y_hi = min(ticks[0], y_lo), max(ticks[-1], y_hi)
    parts = [f'<svg id="{escape(chart_id)}" class="chart" {attrs} xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>"]
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    for t in ticks:
        y = _TOP + plot_h * (1 - (t - y_lo) / (y_hi - y_lo))
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(t)}</text>')
    parts.append(f'<line x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="#333"/>')
    parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" stroke="#333"/>')
    parts.append(f'<text x="{_LEFT + plot_w / 2}" y="{_H - 6}" text-anchor="middle" font-size="12">{escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{_TOP + plot_h / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 14 {_TOP + plot_h / 2})">{escape(y_label)}</text>')
    return parts, y_lo, y_hi


def _legend(parts: list[str], entries: Sequence[tuple[str, str, bool]]) -> None:
    x = _W - _RIGHT + 12
    for i, (name, colour, dashed) in enumerate(entries):
        y = _TOP + 10 + 16 * i
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        parts.append(f'<line x1="{x}" x2="{x + 18}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="3"{dash}/>')
        parts.append(f'<text x="{x + 24}" y="{y + 4}" font-size="11">{escape(name[:22])}</text>')


def _x_positions(xs: Sequence[float]) -> dict[float, float]:
    plot_w = _W - _LEFT - _RIGHT
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    span = hi - lo or 1.0
    pad = plot_w * 0.05
    return {x: _LEFT + pad + (plot_w - 2 * pad) * ((x - lo) / span if hi > lo else 0.5) for x in xs}


def _x_ticks(parts: list[str], pos: dict[float, float]) -> None:
    plot_h = _H - _TOP - _BOTTOM
    every = max(1, math.ceil(len(pos) / 12))  # at most ~12 labels
    for i, (x, px) in enumerate(sorted(pos.items())):
        if i % every == 0:
            parts.append(f'<text x="{px:.1f}" y="{_TOP + plot_h + 15}" text-anchor="middle" font-size="11">{_fmt(x)}</text>')


def line_chart(*, chart_id: str, title: str, x_label: str, y_label: str, series: Sequence[Series],
               guides: Sequence[Guide] = (), y_min: float | None = None) -> str:
    """Lines with markers, one per series, and dashed horizontal guides; an empty chart says so."""
    values = [y for s in series for _, y in s.points if math.isfinite(y)] + [g.y for g in guides]
    xs = sorted({x for s in series for x, _ in s.points})
    if not values or not xs:
        return (f'<p id="{escape(chart_id)}" class="chart empty" data-series="0">{escape(title)}: '
                "nothing recorded yet.</p>")
    lo = min(values) if y_min is None else min(y_min, min(values))
    hi = max(values)
    attrs = f'data-series="{len(series)}" data-points="{sum(len(s.points) for s in series)}"'
    parts, lo, hi = _frame(chart_id, title, x_label, y_label, lo, hi if hi > lo else lo + 1.0, attrs)
    pos = _x_positions(xs)
    plot_h = _H - _TOP - _BOTTOM

    def py(y: float) -> float:
        return _TOP + plot_h * (1 - (y - lo) / (hi - lo))

    legend = []
    for i, g in enumerate(guides):
        parts.append(f'<line class="guide" data-label="{escape(g.label)}" data-y="{g.y!r}" x1="{_LEFT}" '
                     f'x2="{_W - _RIGHT}" y1="{py(g.y):.1f}" y2="{py(g.y):.1f}" stroke="#777" stroke-dasharray="6 4"/>')
        if i == 0 or g.label != guides[i - 1].label:
            legend.append((g.label, "#777", True))
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        pts = [(pos[x], py(y)) for x, y in sorted(s.points) if math.isfinite(y)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        parts.append(f'<g class="series" data-name="{escape(s.name)}" data-points="{len(pts)}">')
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} '
                     f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        parts.append("</g>")
        legend.append((s.name, colour, s.dashed))
    _x_ticks(parts, pos)
    _legend(parts, legend)
    parts.append("</svg>")
    return "\n".join(parts)


def bar_chart(*, chart_id: str, title: str, x_label: str, y_label: str, xs: Sequence[int], bars: Sequence[Bars],
              stacked: bool) -> str:
    """Bars per x: stacked (parts of a whole: sites that replied and that did not) or side by side."""
    if not xs or not bars:
        return f'<p id="{escape(chart_id)}" class="chart empty" data-bars="0">{escape(title)}: nothing recorded yet.</p>'
    totals = [sum(b.values[i] for b in bars) for i in range(len(xs))] if stacked else [v for b in bars for v in b.values]
    hi = max(totals + [0.0]) or 1.0
    attrs = f'data-bars="{len(xs)}"'
    parts, lo, hi = _frame(chart_id, title, x_label, y_label, 0.0, hi, attrs)
    pos = _x_positions([float(x) for x in xs])
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = min(40.0, plot_w * 0.9 / max(1, len(xs)))
    width = slot if stacked else slot / len(bars)

    def py(y: float) -> float:
        return _TOP + plot_h * (1 - (y - lo) / (hi - lo))

    for i, x in enumerate(xs):
        base = 0.0
        parts.append(f'<g class="bar" data-x="{x}">')
        for j, b in enumerate(bars):
            v = b.values[i]
            colour = PALETTE[j % len(PALETTE)]
            left = pos[float(x)] - slot / 2 + (0 if stacked else j * width)
            bottom = base if stacked else 0.0
            top_px, bottom_px = py(bottom + v), py(bottom)
            parts.append(f'<rect data-name="{escape(b.name)}" data-value="{v:g}" x="{left:.1f}" y="{top_px:.1f}" '
                         f'width="{max(width - 1, 1):.1f}" height="{max(bottom_px - top_px, 0):.1f}" fill="{colour}">'
                         f"<title>{escape(b.name)}, {escape(x_label)} {x}: {v:g}</title></rect>")
            if stacked:
                base += v
        parts.append("</g>")
    _x_ticks(parts, pos)
    _legend(parts, [(b.name, PALETTE[j % len(PALETTE)], False) for j, b in enumerate(bars)])
    parts.append("</svg>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ Markdown
def render_markdown(text: str) -> str:
    """A small Markdown subset (what fedtune's model cards use) to HTML; every character of the input is escaped.

    Headings, paragraphs, lists, pipe tables, fenced code, inline code, bold and italics. Links keep
    their text and show their target as text: a card written by whoever trained the run must not
    put a live link (or a ``javascript:`` URL) on the operator's page.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    i = 0
    if lines and lines[0].strip() == "---":  # YAML front matter: shown as it is
        end = next((j for j in range(1, len(lines)) if lines[j].strip() == "---"), None)
        if end is not None:
            out.append(f'<pre class="front-matter">{escape(chr(10).join(lines[1:end]))}</pre>')
            i = end + 1
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append(f"<pre><code>{escape(chr(10).join(lines[i + 1:end]))}</code></pre>")
            i = end + 1
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            level = len(m.group(1))
            out.append(f"<h{level + 2 if level < 5 else 6}>{_inline(m.group(2))}</h{level + 2 if level < 5 else 6}>")
            i += 1
        elif line.lstrip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
            head, rest = (body[0], body[1:]) if len(rows) > 1 and body else ([], body)
            html = "".join(f"<th>{_inline(c)}</th>" for c in head)
            out.append("<table class=\"card-table\">" + (f"<tr>{html}</tr>" if html else "")
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
        elif re.match(r"\s*([-*]|\d+\.)\s+", line):
            ordered = bool(re.match(r"\s*\d+\.", line))
            items = []
            while i < len(lines) and (m := re.match(r"\s*([-*]|\d+\.)\s+(.*)", lines[i])) and m.group(1)[0].isdigit() == ordered:
                items.append(f"<li>{_inline(m.group(2))}</li>")
                i += 1
            tag = "ol" if ordered else "ul"
            out.append(f"<{tag}>{''.join(items)}</{tag}>")
        elif not line.strip():
            i += 1
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,6}\s|```|\s*\||\s*([-*]|\d+\.)\s)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _inline(text: str) -> str:
    parts = re.split(r"(`[^`]*`)", text)  # code spans first: nothing inside them is markup
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) >= 2:
            out.append(f"<code>{escape(part[1:-1])}</code>")
            continue
        s = escape(part)
        s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"\1 (\2)", s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", s)
        out.append(s)
    return "".join(out)
