"""Training curves from TensorBoard event files, as one PNG (for READMEs and reports).

    python -m benchmarks.curves runs/recipes/eurosat_scratch_cpu [RUN ...] --out curves.png

One panel per scalar (default: ``train/loss``, ``train/logit_scale``, ``train/lr`` and every
``eval/*`` scalar that has more than one point), one line per run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT = ["train/loss", "train/logit_scale", "train/lr"]


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a run's event files: ``{tag: [(step, value), ...]}``, sorted by step.

    Raises:
        FileNotFoundError: the folder holds no event files.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(Path(run_dir).rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files (TensorBoard logs live in a run's tb/ folder)")
    loaded = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        events = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
        first = min((e.wall_time for evs in events.values() for e in evs), default=0.0)
        loaded.append((first, events))
    # A resumed run writes a new file per attempt. File names do not sort by time (their
    # per-process counter goes ...8, 9, 10), so order by first write; later values win.
    series: dict[str, dict[int, float]] = {}
    for _, events in sorted(loaded, key=lambda x: x[0]):
        for tag, evs in events.items():
            series.setdefault(tag, {}).update({e.step: e.value for e in evs})
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot(runs: dict[str, dict[str, list[tuple[int, float]]]], tags: list[str] | None, out: str | Path) -> list[str]:
    """Draw ``tags`` (default: :data:`DEFAULT` + multi-point eval scalars) for each run; returns the tags drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {t for s in runs.values() for t in s}
    if tags is None:
        evals = sorted(t for t in present if t.startswith("eval/") and max(len(s.get(t, [])) for s in runs.values()) > 1)
        tags = [t for t in DEFAULT if t in present] + evals
    missing = [t for t in tags if t not in present]
    if missing or not tags:
        raise ValueError(f"nothing to plot for {missing or 'the default scalars'}: not in the event files "
                         f"(present: {', '.join(sorted(present))})")
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.2), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        for name, series in runs.items():
            points = series.get(tag, [])
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=name, marker="." if len(points) < 30 else None)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return tags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.curves", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (their TensorBoard event files)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--scalar", action="append", dest="tags", help="tag to draw (repeatable); default: see above")
    args = p.parse_args(argv)
    runs = {Path(r).name: read_scalars(r) for r in args.runs}
    tags = plot(runs, args.tags, args.out)
    print(f"[curves] {', '.join(tags)} of {len(runs)} run(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
