"""The benchmark's PNG: SVG bar charts screenshotted by headless Chromium (Debian's
`chromium`, the same tool that renders the dashboard image), so no plotting library is
needed."""
from __future__ import annotations

import html
import shutil
import subprocess
import tempfile
from pathlib import Path


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: str, out: Path, width: int, height: int) -> None:
    """Render an HTML page to a PNG with headless Chromium."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("chromium is missing: deploy/setup-system.sh --with-chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        page_path = Path(work) / "page.html"
        page_path.write_text(page)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={work}/profile", f"--window-size={width},{height}",
                        f"--screenshot={out.resolve()}", page_path.as_uri()], check=True, capture_output=True, timeout=120)


def _bars(title: str, bars: list[tuple[str, float, str]], unit: str, width: int = 520, height: int = 260) -> str:
    top = max([v for _, v, _ in bars] + [1e-9]) * 1.15
    slot = (width - 60) / max(len(bars), 1)
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="10" y="18" font-size="15" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="50" y1="{height - 40}" x2="{width - 10}" y2="{height - 40}" stroke="#999"/>']
    for i, (label, value, color) in enumerate(bars):
        h = value / top * (height - 80)
        x = 55 + i * slot
        parts.append(f'<rect x="{x:.0f}" y="{height - 40 - h:.0f}" width="{slot * 0.7:.0f}" height="{h:.0f}" fill="{color}"/>')
        parts.append(f'<text x="{x + slot * 0.35:.0f}" y="{height - 44 - h:.0f}" font-size="12" '
                     f'text-anchor="middle">{value:,.0f} {unit}</text>')
        parts.append(f'<text x="{x + slot * 0.35:.0f}" y="{height - 22}" font-size="11" '
                     f'text-anchor="middle">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bench_png(result, out: Path) -> None:
    if chromium() is None:
        print("plot skipped: chromium is missing (deploy/setup-system.sh --with-chromium)")
        return
    charts = [_bars("Throughput (events/s), same run", [
        ("raw aiokafka passthrough", result.passthrough_rate, "#7f7f7f"),
        ("+ per-customer state", result.stateful_passthrough_rate, "#bcbd22"),
        (f"tagstream ({result.ratio:.2f}×)", result.worker_rate, "#1f77b4")], "/s")]
    latency = []
    for share, rate, n, p50, p99, top, _ in result.latency:
        latency += [(f"{share:.0%} p50", p50, "#2ca02c"), (f"{share:.0%} p99", p99, "#d62728")]
    charts.append(_bars("Real-time report latency (ms) at offered load", latency, "ms", width=640))
    page = ("<html><body style='font-family:sans-serif;margin:10px'>"
            f"<h3>tagstream worker benchmark: {result.events:,} events, {result.rules:,} rule versions</h3>"
            + "".join(f"<div style='display:inline-block;margin:6px;border:1px solid #ddd'>{c}</div>" for c in charts)
            + f"<p style='font-size:12px'>CPU {result.worker_cpu_us_per_event:,.0f} µs/event, "
              f"peak RSS {result.worker_peak_rss_mb:,.0f} MiB</p></body></html>")
    screenshot(page, out, 1240, 360)
