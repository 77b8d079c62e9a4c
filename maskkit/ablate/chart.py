"""The report's PNG chart: per evaluation, each arm's score with every seed as a point (left), and each
comparison's paired difference with its 95% paired t interval (right; zero marked).

Drawn with matplotlib (Agg) when it is installed (`pip install maskkit[plot]`), else with PIL alone
(`draw_chart_pil`: the same panels, plainer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Report

__all__ = ["draw_chart"]

#: point colours of the seeds (cycled)
SEED_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
VERDICT_COLOURS = {"beats": "#2ca02c", "loses": "#d62728", "ties within noise": "#7f7f7f"}


def draw_chart(report: Report, path: str | Path) -> Path:
    """Draw the chart of `report` into `path` (PNG); returns the path."""
    try:
        import matplotlib
    except ImportError:
        return draw_chart_pil(report, path)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    protocols = list(report.study.evaluations)
    arms = [a for a in report.arms if a.rows]
    n_comp = max(1, max((sum(1 for p, _ in report.comparisons if p == q) for q in protocols), default=1))
    height = max(2.8, 0.45 * max(len(arms), n_comp) + 1.4)
    fig, axes = plt.subplots(len(protocols), 2, figsize=(12, height * len(protocols)), squeeze=False)
    seeds = sorted({s for a in arms for s in a.per_seed.get(protocols[0], {})} | set(report.study.seeds))
    for row, protocol in enumerate(protocols):
        metric = {"linear": "linear probe", "finetune": "fine-tune"}.get(protocol, protocol)
        left, right = axes[row]
        for y, arm in enumerate(arms):
            points = arm.per_seed.get(protocol, {})
            for seed, value in sorted(points.items()):
                colour = SEED_COLOURS[seeds.index(seed) % len(SEED_COLOURS)] if seed in seeds else "black"
                lift = 0.12 * (seeds.index(seed) - (len(seeds) - 1) / 2) if seed in seeds else 0.0  # equal scores stay apart
                left.scatter(value, y + lift, color=colour, s=28, zorder=3, label=f"seed {seed}" if y == 0 or seed not in
                             arms[0].per_seed.get(protocol, {}) else None)  # fmt: skip
            summary = arm.scores.get(protocol)
            if summary is not None:
                left.plot([summary.mean, summary.mean], [y - 0.3, y + 0.3], color="black", lw=2, zorder=2)
                if summary.sd is not None:
                    left.plot([summary.mean - summary.sd, summary.mean + summary.sd], [y, y], color="black", lw=0.8)
        left.set_yticks(range(len(arms)), [a.arm for a in arms])
        left.invert_yaxis()
        left.set_xlabel(f"{metric} top-1 % (test): seeds as points, mean as bar, ± sd", fontsize=8)
        left.grid(axis="x", alpha=0.3)
        handles, labels = left.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=False))
        if unique:
            left.legend(unique.values(), unique.keys(), fontsize=7, loc="best", framealpha=0.6)
        comps = [c for p, c in report.comparisons if p == protocol]
        for y, c in enumerate(comps):
            colour = VERDICT_COLOURS[c.verdict]
            if c.low is not None:
                right.plot([c.low, c.high], [y, y], color=colour, lw=2.5)
            right.scatter(c.differences, [y] * c.n, color="black", s=10, zorder=3)
            right.scatter([c.mean], [y], color=colour, marker="D", s=36, zorder=4)
        right.axvline(0, color="black", lw=0.8)
        right.set_yticks(range(len(comps)), [f"{c.arm} − {c.reference}\n({c.basis}: {c.verdict})" for c in comps],
                         fontsize=8)  # fmt: skip
        right.invert_yaxis()
        right.set_xlabel(f"paired Δ {metric}, points: 95% paired-t CI, ◆ mean, • seeds", fontsize=8)
        right.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{report.study.name}: {report.study.data}, seeds {', '.join(map(str, report.study.seeds))}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def draw_chart_pil(report: Report, path: str | Path) -> Path:
    """The chart with PIL only: per evaluation a row of two panels (scores, paired intervals)."""
    from PIL import Image, ImageDraw

    path = Path(path)
    protocols = list(report.study.evaluations)
    arms = [a for a in report.arms if a.rows]
    seeds = sorted(set(report.study.seeds) | {s for a in arms for p in protocols for s in a.per_seed.get(p, {})})
    line, label_w, panel_w, pad = 22, 260, 360, 16
    blocks = []
    for protocol in protocols:
        comps = [c for p, c in report.comparisons if p == protocol]
        blocks.append((protocol, comps, 40 + line * max(len(arms), len(comps), 1) + 30))
    width = 2 * (label_w + panel_w) + 3 * pad
    image = Image.new("RGB", (width, sum(h for _, _, h in blocks) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, 8), f"{report.study.name}: {report.study.data}, seeds {', '.join(map(str, report.study.seeds))}",
              fill="black")  # fmt: skip
    top = 30

    def axis(x0: int, lo: float, hi: float) -> Callable[[float], float]:
        span = (hi - lo) or 1.0
        return lambda v: x0 + (v - lo) / span * panel_w

    for protocol, comps, height in blocks:
        metric = {"linear": "linear probe", "finetune": "fine-tune"}.get(protocol, protocol)
        values = [v for a in arms for v in a.per_seed.get(protocol, {}).values()]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        lo, hi = lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1)
        x0 = pad + label_w
        to_x = axis(x0, lo, hi)
        draw.text((x0, top), f"{metric} top-1 % (test): seeds as dots, mean as bar  [{lo:.1f} .. {hi:.1f}]",
                  fill="black")  # fmt: skip
        for i, arm in enumerate(arms):
            y = top + 30 + i * line
            draw.text((pad, y - 6), arm.arm[:40], fill="black")
            draw.line([(x0, y), (x0 + panel_w, y)], fill=(230, 230, 230))
            for seed, value in arm.per_seed.get(protocol, {}).items():
                x = to_x(value)
                colour = _hex(SEED_COLOURS[seeds.index(seed) % len(SEED_COLOURS)])
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            summary = arm.scores.get(protocol)
            if summary is not None:
                x = to_x(summary.mean)
                draw.line([(x, y - 8), (x, y + 8)], fill="black", width=3)
        ends = [v for c in comps for v in (c.low, c.high, *c.differences) if v is not None] + [0.0]
        clo, chi = min(ends), max(ends)
        clo, chi = clo - 0.05 * (chi - clo or 1), chi + 0.05 * (chi - clo or 1)
        x1 = 2 * pad + 2 * label_w + panel_w
        to_x = axis(x1, clo, chi)
        draw.text((x1, top), f"paired difference, {metric}, points: 95% paired-t CI  [{clo:+.1f} .. {chi:+.1f}]",
                  fill="black")  # fmt: skip
        zero = to_x(0.0)
        draw.line([(zero, top + 20), (zero, top + 30 + line * max(len(comps), 1))], fill="black")
        for i, c in enumerate(comps):
            y = top + 30 + i * line
            colour = _hex(VERDICT_COLOURS[c.verdict])
            draw.text((x1 - label_w, y - 6), f"{c.arm} - {c.reference}"[:42], fill="black")  # PIL's font: ASCII
            if c.low is not None:
                draw.line([(to_x(c.low), y), (to_x(c.high), y)], fill=colour, width=4)
            for d in c.differences:
                draw.ellipse([to_x(d) - 2, y - 2, to_x(d) + 2, y + 2], fill="black")
            x = to_x(c.mean)
            draw.polygon([(x, y - 6), (x + 6, y), (x, y + 6), (x - 6, y)], fill=colour)
        top += height
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
