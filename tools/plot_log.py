#!/usr/bin/env python3
"""Plot training curves of one or more logs, overlaid: train loss and val_bpb against steps and wall-clock.

Four panels: train loss vs step, train loss vs training time, val_bpb vs step, val_bpb vs training time (the
val_bpb points of VAL_LOSS_EVERY, plus each run's final scores as markers at its last step: pre-quantization,
round trip and the submission metric). Training time is the script's own clock (evaluation excluded).
Needs matplotlib, an optional dependency: pip install matplotlib.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.logparse import PREFERRED_METRICS, Log, ToolError, cli  # noqa: E402

FINAL_MARKERS = (("pre_quant_exact", "o", "pre-quant"), ("final_roundtrip_exact", "s", "round trip"), (None, "*", "submission metric"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", metavar="LOG", help="training logs (this project's or upstream format)")
    ap.add_argument("-o", "--out", required=True, help="image to write (.png, .svg, .pdf)")
    ap.add_argument("--title", help="figure title")
    a = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolError("plot_log.py needs matplotlib, an optional dependency: pip install matplotlib") from None
    logs = [Log(p) for p in a.logs]
    if not any(lg.train or lg.val or lg.finals for lg in logs):
        raise ToolError("no step or score lines in " + ", ".join(lg.path for lg in logs))
    fig, ax = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    for i, lg in enumerate(logs):
        color, label = f"C{i % 10}", lg.label()
        for col, x in ((0, "step"), (1, "time_ms")):
            tr = [p for p in lg.train if p[x] is not None]
            ax[0][col].plot([p[x] / (1000 if col else 1) for p in tr], [p["loss"] for p in tr], color=color, label=label, lw=1)
            va = [p for p in lg.val if p[x] is not None]
            ax[1][col].plot([p[x] / (1000 if col else 1) for p in va], [p["bpb"] for p in va], color=color, label=label, marker=".", lw=1)
            end = lg.steps if col == 0 else (lg.train_ms / 1000 if lg.train_ms is not None else None)
            for key, marker, _ in FINAL_MARKERS:
                key = key or (lg.metric_name if lg.metric_name not in PREFERRED_METRICS[1:] else None)
                y = lg.final(key) if key else None
                if end is not None and y is not None:
                    ax[1][col].plot([end], [y], color=color, marker=marker, ms=8, ls="none")
    for (r, c), (xl, yl) in {(0, 0): ("step", "train loss (nats/token)"), (0, 1): ("training time (s)", "train loss (nats/token)"),
                             (1, 0): ("step", "val_bpb"), (1, 1): ("training time (s)", "val_bpb")}.items():
        ax[r][c].set(xlabel=xl, ylabel=yl)
        ax[r][c].grid(alpha=0.3)
    ax[0][0].legend(fontsize=8)
    handles = [plt.Line2D([], [], color="gray", marker=m, ls="none", label=t) for _, m, t in FINAL_MARKERS]
    ax[1][0].legend(handles=handles, fontsize=8, title="final scores")
    fig.suptitle(a.title or ", ".join(lg.label() for lg in logs)[:120])
    fig.tight_layout()
    tmp = f"{a.out}.tmp{os.getpid()}{os.path.splitext(a.out)[1]}"
    try:
        fig.savefig(tmp, dpi=110, format=os.path.splitext(a.out)[1][1:] or "png")
        os.replace(tmp, a.out)
    except (OSError, ValueError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ToolError(f"cannot write {a.out}: {getattr(e, 'strerror', None) or e}") from None
    print(f"wrote {a.out}: {len(logs)} run(s)")
    return 0


if __name__ == "__main__":
    cli(main)
