#!/usr/bin/env python3
"""Plot training curves of one or more logs, overlaid: train loss and val_bpb against steps and wall-clock.

Four panels: train loss vs step, train loss vs training time, val_bpb vs step, val_bpb vs training time (the
periodic val_bpb points, plus each run's final scores as markers at its last step: pre-quant, round trip, sliding
window, test-time-trained, and a ring around the submission metric). Training time is the script's own clock
(evaluation excluded); the val_bpb axes leave out the step-0 value. Reads every log format tools/logparse.py reads (this project's and every era of the public
records). Runs are labelled by file name and seed; when two logs share a file name (train.log of several records),
by their folder too. A run with no step or score lines is reported on stderr, not drawn.
Needs matplotlib (in requirements.txt).
"""
from __future__ import annotations

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import UserError, cli, write_atomic  # noqa: E402
from tools.logparse import KIND_NAMES, KINDS, Log  # noqa: E402

MARKERS = dict(pre="o", roundtrip="s", sliding="^", ttt="D")


def labels(logs: list[Log]) -> list[str]:
    """file name (seed N); parent folder/file name when file names repeat."""
    names = [lg.name for lg in logs]
    out = []
    for lg in logs:
        name = lg.name if names.count(lg.name) == 1 else os.path.join(os.path.basename(os.path.dirname(os.path.abspath(lg.path))), lg.name)
        out.append(f"{name} (seed {lg.seed})" if lg.seed is not None else name)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", metavar="LOG", help="training logs (this project's or a public record's)")
    ap.add_argument("-o", "--out", required=True, help="image to write (.png, .svg, .pdf)")
    ap.add_argument("--title", help="figure title")
    a = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot_log.py needs matplotlib: pip install -r requirements.txt") from None
    logs = [Log(p) for p in a.logs]
    names = labels(logs)
    for lg, name in zip(logs, names):
        if not (lg.train or lg.val or lg.scores):
            print(f"warning: {name}: no step or score lines; nothing to draw", file=sys.stderr)
        elif not lg.train:
            print(f"warning: {name}: no train_loss step lines", file=sys.stderr)
    if not any(lg.train or lg.val or lg.scores for lg in logs):
        raise UserError("no step or score lines in " + ", ".join(lg.path for lg in logs))
    fig, ax = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    for i, (lg, label) in enumerate(zip(logs, names)):
        color = f"C{i % 10}"
        for col, x in ((0, "step"), (1, "time_ms")):
            tr = [p for p in lg.train if p[x] is not None]
            ax[0][col].plot([p[x] / (1000 if col else 1) for p in tr], [p["loss"] for p in tr], color=color, label=label, lw=1)
            va = [p for p in lg.val if p[x] is not None]
            ax[1][col].plot([p[x] / (1000 if col else 1) for p in va], [p["bpb"] for p in va], color=color, label=label, marker=".", lw=1)
            end = lg.steps if col == 0 else (lg.train_ms / 1000 if lg.train_ms is not None else None)
            if end is None:
                continue
            for kind in KINDS:
                s = lg.score(kind)
                if s is not None:
                    ax[1][col].plot([end], [s["val_bpb"]], color=color, marker=MARKERS[kind], ms=7, ls="none")
            if lg.metric is not None:
                ax[1][col].plot([end], [lg.val_bpb], color=color, marker="o", ms=14, mfc="none", ls="none")
    later = [p["bpb"] for lg in logs for p in lg.val if p["step"] > 0] + [s["val_bpb"] for lg in logs for s in lg.scores]
    if later:  # the step-0 value (about log2(vocab) bits) would squash the curves that matter
        for c in (0, 1):
            ax[1][c].set_ylim(min(later) - 0.02, max(later) + 0.05)
    for (r, c), (xl, yl) in {(0, 0): ("step", "train loss (nats/token)"), (0, 1): ("training time (s)", "train loss (nats/token)"),
                             (1, 0): ("step", "val_bpb"), (1, 1): ("training time (s)", "val_bpb")}.items():
        ax[r][c].set(xlabel=xl, ylabel=yl)
        ax[r][c].grid(alpha=0.3)
    ax[0][0].legend(fontsize=8)
    handles = [plt.Line2D([], [], color="gray", marker=MARKERS[k], ls="none", label=KIND_NAMES[k]) for k in KINDS]
    handles.append(plt.Line2D([], [], color="gray", marker="o", ms=12, mfc="none", ls="none", label="submission metric"))
    ax[1][0].legend(handles=handles, fontsize=8, title="final scores")
    title = ", ".join(names)
    fig.suptitle(a.title or (title if len(title) <= 120 else f"{len(names)} runs"))
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=110, format=os.path.splitext(a.out)[1][1:] or "png")
    except ValueError as e:  # a format matplotlib does not know
        raise UserError(f"cannot write {a.out}: {e}") from None
    write_atomic(a.out, image.getvalue(), what="plot")
    print(f"wrote {a.out}: {len(logs)} run(s)")
    return 0


if __name__ == "__main__":
    cli(main)
