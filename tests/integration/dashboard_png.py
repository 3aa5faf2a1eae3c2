"""Render the dashboard's key panels from a real run to one PNG.

Each panel's query (exactly as in deploy/grafana/tagstream.json, with `$__rate_interval` at
10 s as Grafana would pick it for a 1 s scrape) is evaluated by Prometheus's HTTP API over
the run, drawn as SVG, and screenshotted by headless Chromium (Debian's `chromium`). Called by
tests/integration/test_observability.py when TAGSTREAM_DASHBOARD_PNG is set.
"""
from __future__ import annotations

import html
import json
import math
import urllib.parse
import urllib.request
from pathlib import Path

from bench.plot import screenshot

KEY_PANELS = ["Events processed by outcome", "Reports emitted by type", "Lag in messages", "Lag in seconds",
              "API requests by outcome", "Retries by reason", "Dead letters by reason", "Held delayed reports"]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22"]
W, H, PAD = 620, 230, 44


def _query_range(prometheus_url: str, expr: str, start: float, end: float) -> list:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 1})
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/query_range?{params}", timeout=30) as answer:
        return json.loads(answer.read())["data"]["result"]


def _legend(metric: dict, template: str) -> str:
    text = template
    for key, value in metric.items():
        text = text.replace("{{" + key + "}}", value.split(".")[-1] if key == "topic" or key == "group" else value)
    return text.replace("{{", "").replace("}}", "")


def _panel_svg(title: str, series: list, legend: str, start: float, end: float, threshold) -> str:
    points = [(float(t), float(v)) for s in series for t, v in s["values"] if not math.isnan(float(v))]
    top = max([v for _, v in points] + [threshold or 0, 1e-9]) * 1.1
    x = lambda t: PAD + (t - start) / max(end - start, 1) * (W - PAD - 10)
    y = lambda v: H - 24 - v / top * (H - 48)
    parts = [f'<svg width="{W}" height="{H + 20 * ((len(series) + 2) // 3)}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{PAD}" y="16" font-size="14" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{H - 24}" x2="{W - 10}" y2="{H - 24}" stroke="#999"/>',
             f'<line x1="{PAD}" y1="24" x2="{PAD}" y2="{H - 24}" stroke="#999"/>']
    for frac in (0, 0.5, 1):
        value = top / 1.1 * frac
        parts.append(f'<text x="{PAD - 4}" y="{y(value) + 4:.0f}" font-size="10" text-anchor="end">{value:.3g}</text>')
        parts.append(f'<line x1="{PAD}" y1="{y(value):.0f}" x2="{W - 10}" y2="{y(value):.0f}" stroke="#eee"/>')
    for seconds in range(0, int(end - start) + 1, 15):
        parts.append(f'<text x="{x(start + seconds):.0f}" y="{H - 8}" font-size="10" text-anchor="middle">{seconds}s</text>')
    if threshold is not None:
        parts.append(f'<line x1="{PAD}" y1="{y(threshold):.0f}" x2="{W - 10}" y2="{y(threshold):.0f}" '
                     f'stroke="red" stroke-dasharray="4"/>')
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        line = " ".join(f"{x(float(t)):.1f},{y(float(v)):.1f}" for t, v in s["values"] if not math.isnan(float(v)))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{line}"/>')
        lx, ly = PAD + (i % 3) * 190, H + 12 + 20 * (i // 3)
        parts.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{lx + 14}" y="{ly + 1}" font-size="11">{html.escape(_legend(s["metric"], legend))[:30]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render(prometheus_url: str, out: Path, start: float, end: float, group: str) -> None:
    from tests.unit.test_observability import load_observability
    observability = load_observability()
    specs = {p.title: p for row in observability.ROWS for p in row.panels}
    cells = []
    for title in KEY_PANELS:
        spec = specs[title]
        query = spec.queries[0]
        expr = observability.prometheus_expr(query.expr).replace("[5m]", "[10s]")
        series = _query_range(prometheus_url, expr, start, end)
        cells.append(f'<div class="cell">{_panel_svg(title, series, query.legend, start, end, spec.threshold)}'
                     f'<code>{html.escape(query.expr)[:120]}</code></div>')
    page = ("<html><body style='font-family:sans-serif;margin:12px'>"
            "<h3>tagstream: key dashboard panels from a real run (Prometheus query_range, 1 s scrape)</h3>"
            "<p style='font-size:12px'>Phase 1 (0-20 s): live traffic with malformed records and an API failing "
            "20% of requests; phase 2: the worker paused (SIGSTOP) while 10-minute-old records arrive.</p>"
            "<style>.cell{display:inline-block;vertical-align:top;margin:4px;border:1px solid #ddd;padding:4px}"
            "code{display:block;font-size:9px;color:#555;width:610px;overflow:hidden;white-space:nowrap}</style>"
            + "".join(cells) + "</body></html>")
    screenshot(page, out, 1300, 1400)
