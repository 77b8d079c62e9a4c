"""The report's PNG chart: per evaluation, each arm's score with every seed as a point (left), and each
comparison's paired difference with its 95% paired t interval (right; zero marked). matplotlib (Agg).
"""

from __future__ import annotations

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
    import matplotlib

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
                left.scatter(value, y, color=colour, s=28, zorder=3, label=f"seed {seed}" if y == 0 or seed not in
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
