#!/usr/bin/env python3
"""Is the new result a record? The one-sided Welch t-test of the competition rule.

A new record must beat the current one by at least 0.005 nats with p < 0.01. The test runs on val_loss, the
natural-log cross-entropy per token (nats/token) of each log's submission metric (final_sliding_exact when present,
else final_roundtrip_exact; other formats: their last final *_exact line):

    improvement d = mean(old) - mean(new)            (positive = new is better)
    H0: d <= THRESHOLD        H1: d > THRESHOLD      (THRESHOLD = 0.005 nats)
    t  = (d - THRESHOLD) / sqrt(s_new^2/n_new + s_old^2/n_old)           (s = sample std, n - 1)
    df = Welch-Satterthwaite;  p = P(T_df >= t)      significant when p < ALPHA (0.01)

The t distribution's tail comes from the regularized incomplete beta function (continued fraction); no scipy.
A single old run (or --old-n 1) is a fixed reference: its variance term is 0 and df = n_new - 1 (the one-sample
test). Exit status 0 only when the improvement is significant.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.logparse import Log, ToolError, cli, mean_std  # noqa: E402


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by the modified Lentz continued fraction."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h / a


def t_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with df degrees of freedom (df may be fractional)."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def welch(new: list[float], old_mean: float, old_std: float, old_n: int, threshold: float = 0.005) -> dict:
    """One-sided Welch test of mean(old) - mean(new) > threshold. Returns the numbers."""
    if len(new) < 2:
        raise ToolError(f"need at least 2 new runs for a t-test, got {len(new)}")
    if old_n < 1:
        raise ToolError("--old-n must be at least 1")
    m_new, s_new = mean_std(new)
    v_new, v_old = s_new ** 2 / len(new), (old_std ** 2 / old_n if old_n > 1 else 0.0)
    se = math.sqrt(v_new + v_old)
    if se == 0:
        raise ToolError("all values are identical (zero variance): the t-test is undefined")
    d = old_mean - m_new
    t = (d - threshold) / se
    df = (v_new + v_old) ** 2 / (v_new ** 2 / (len(new) - 1) + (v_old ** 2 / (old_n - 1) if old_n > 1 else 0.0))
    return dict(new_mean=m_new, new_std=s_new, new_n=len(new), old_mean=old_mean, old_std=old_std if old_n > 1 else 0.0,
                old_n=old_n, improvement=d, threshold=threshold, se=se, t=t, df=df, p=t_sf(t, df))


def _losses(paths, side):
    logs = [Log(p) for p in paths]
    for lg in logs:
        if lg.val_loss is None:
            raise ToolError(f"{lg.path} has no final val_loss line (did the run finish?)")
    names = {lg.metric_name for lg in logs}
    if len(names) > 1:
        print(f"warning: {side} logs use different metrics: {', '.join(sorted(names))}", file=sys.stderr)
    seeds = [lg.seed for lg in logs if lg.seed is not None]
    if len(seeds) != len(set(seeds)):
        print(f"warning: {side} logs repeat a seed ({seeds}); runs should be independent", file=sys.stderr)
    return logs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", nargs="+", required=True, metavar="LOG", help="logs of the new submission (one per seed)")
    ap.add_argument("--old", nargs="+", metavar="LOG", help="logs of the current record")
    ap.add_argument("--old-mean", type=float, help="current record's mean val_loss (nats/token), instead of --old")
    ap.add_argument("--old-std", type=float, default=0.0, help="its sample standard deviation (n - 1)")
    ap.add_argument("--old-n", type=int, help="its number of runs")
    ap.add_argument("--threshold", type=float, default=0.005, help="required improvement in nats/token (default 0.005)")
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    a = ap.parse_args(argv)
    if (a.old is None) == (a.old_mean is None):
        ap.error("give either --old LOG... or --old-mean X --old-std S --old-n N")
    if a.old_mean is not None and a.old_n is None:
        ap.error("--old-mean needs --old-n (and --old-std unless --old-n is 1)")
    if a.old_mean is not None and a.old_n > 1 and a.old_std <= 0:
        ap.error("--old-std must be positive when --old-n > 1")
    new = _losses(a.new, "new")
    if a.old:
        old = _losses(a.old, "old")
        olds = [lg.val_loss for lg in old]
        o_mean, o_std = mean_std(olds)
        o_n = len(olds)
        metrics = {lg.metric_name for lg in old} ^ {lg.metric_name for lg in new}
        if metrics:
            print(f"warning: old and new logs use different metrics ({', '.join(sorted(m or '?' for m in metrics))})", file=sys.stderr)
    else:
        old, o_mean, o_std, o_n = [], a.old_mean, a.old_std, a.old_n
    r = welch([lg.val_loss for lg in new], o_mean, o_std, o_n, a.threshold)
    for side, logs, m, s, n in (("new", new, r["new_mean"], r["new_std"], r["new_n"]), ("old", old, o_mean, r["old_std"], o_n)):
        vals = " ".join(f"{lg.val_loss:.6f}" for lg in logs)
        bpb = [lg.val_bpb for lg in logs if lg.val_bpb is not None]
        extra = f"  (val_bpb mean {sum(bpb) / len(bpb):.6f})" if logs and len(bpb) == len(logs) else ""
        print(f"{side}: n={n} mean val_loss={m:.6f} std={s:.6f} nats/token{extra}" + (f"  [{vals}]" if vals else ""))
    print(f"improvement: {r['improvement']:.6f} nats/token (old - new); required > {a.threshold}")
    print(f"test: one-sided Welch t-test, H0: improvement <= {a.threshold} vs H1: improvement > {a.threshold} (val_loss, nats/token)")
    print(f"t={r['t']:.4f} df={r['df']:.2f} se={r['se']:.6f} p={r['p']:.3g}")
    ok = r["p"] < a.alpha
    print(f"verdict: {'SIGNIFICANT' if ok else 'NOT significant'} (p {'<' if ok else '>='} {a.alpha})")
    return 0 if ok else 1


if __name__ == "__main__":
    cli(main)
