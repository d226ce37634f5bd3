#!/usr/bin/env python3
"""Is the new result a record? The one-sided Welch t-test of the competition rule, computed by SciPy.

A new record must beat the current one by at least 0.005 nats with p < 0.01. The test runs on val_loss, the
natural-log cross-entropy per token (nats/token) of each log's submission metric (the last evaluation the log
reports: test-time-trained > sliding window > round trip, whatever the line is called):

    improvement d = mean(old) - mean(new)            (positive = new is better)
    H0: d <= THRESHOLD        H1: d > THRESHOLD      (THRESHOLD = 0.005 nats)
    t  = (d - THRESHOLD) / sqrt(s_new^2/n_new + s_old^2/n_old)           (s = sample std, n - 1)
    df = Welch-Satterthwaite;  p = P(T_df >= t)      significant when p < ALPHA (0.01)

p comes from scipy.stats.ttest_ind_from_stats(equal_var=False, alternative="greater"). A single old run (or
--old-n 1) is a fixed reference: scipy.stats.ttest_1samp on the new runs (df = n_new - 1).

val_loss is per token, so it only compares runs of the same tokenizer. The ratio val_loss / val_bpb (ln 2 x bytes per
token) tells tokenizers apart: when old and new differ by more than 0.5 %, the test is refused unless --bpb is given,
which runs it on val_bpb with the bar converted through the old side's ratio (0.005 nats/token of the current record).
Byte-identical duplicate logs count once (with a warning). Exit status 0 only when the improvement is significant.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import UserError, cli  # noqa: E402
from tools.logparse import Log, mean_std, unique_logs  # noqa: E402

RATIO_TOLERANCE = 0.005  # relative difference of val_loss/val_bpb above which two sides used different tokenizers


def welch(new: list[float], old_mean: float, old_std: float, old_n: int, threshold: float = 0.005) -> dict:
    """One-sided Welch test of mean(old) - mean(new) > threshold. Returns the numbers."""
    from scipy import stats
    if len(new) < 2:
        raise UserError(f"need at least 2 new runs for a t-test, got {len(new)}")
    if old_n < 1:
        raise UserError("--old-n must be at least 1")
    m_new, s_new = mean_std(new)
    v_new, v_old = s_new ** 2 / len(new), (old_std ** 2 / old_n if old_n > 1 else 0.0)
    se = math.sqrt(v_new + v_old)
    if se == 0:
        raise UserError("all values are identical (zero variance): the t-test is undefined")
    if old_n > 1:  # old vs (new + threshold): mean(old) - mean(new) > threshold
        r = stats.ttest_ind_from_stats(old_mean, old_std, old_n, m_new + threshold, s_new, len(new), equal_var=False, alternative="greater")
        t, p = r.statistic, r.pvalue
        df = (v_new + v_old) ** 2 / (v_new ** 2 / (len(new) - 1) + v_old ** 2 / (old_n - 1))
    else:  # mean(new) < old - threshold
        r = stats.ttest_1samp(new, old_mean - threshold, alternative="less")
        t, p, df = -r.statistic, r.pvalue, len(new) - 1
    return dict(new_mean=m_new, new_std=s_new, new_n=len(new), old_mean=old_mean, old_std=old_std if old_n > 1 else 0.0,
                old_n=old_n, improvement=old_mean - m_new, threshold=threshold, se=se, t=float(t), df=df, p=float(p))


def read_side(paths, side, warn=print) -> list[Log]:
    """The logs of one side, duplicates counted once; every log must have a final score."""
    logs, notes = unique_logs([Log(p) for p in paths])
    for n in notes:
        warn(f"warning: {side}: {n}")
    for lg in logs:
        if lg.val_loss is None:
            raise UserError(f"{lg.path} has no final val_loss line (did the run finish?)")
    kinds = {lg.metric_kind for lg in logs}
    if len(kinds) > 1:
        warn(f"warning: {side} logs use different kinds of metric: {', '.join(sorted(kinds))}")
    seeds = [lg.seed for lg in logs if lg.seed is not None]
    if len(seeds) != len(set(seeds)):
        warn(f"warning: {side} logs repeat a seed ({seeds}); runs should be independent")
    return logs


def units(new: list[Log], old: list[Log], threshold: float, bpb: bool) -> tuple[str, float, str]:
    """('val_loss' | 'val_bpb', threshold in those units, note). Refuses different tokenizers unless bpb."""
    rn, ro = (mean_std([lg.nats_per_bpb for lg in side])[0] for side in (new, old))
    same = abs(rn - ro) <= RATIO_TOLERANCE * ro
    if bpb:
        return "val_bpb", threshold / ro, (f"compared in val_bpb; the {threshold} nats/token bar is {threshold / ro:.6f} bpb through the "
                                            f"old runs' val_loss/val_bpb = {ro:.5f}" + ("" if same else f" (new runs: {rn:.5f}, another tokenizer)"))
    if not same:
        raise UserError(f"old and new runs used different tokenizers (val_loss/val_bpb {ro:.5f} vs {rn:.5f}): val_loss per token "
                        "does not compare; give --bpb to test val_bpb with the bar converted")
    return "val_loss", threshold, ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", nargs="+", required=True, metavar="LOG", help="logs of the new submission (one per seed)")
    ap.add_argument("--old", nargs="+", metavar="LOG", help="logs of the current record")
    ap.add_argument("--old-mean", type=float, help="current record's mean val_loss (nats/token), instead of --old")
    ap.add_argument("--old-std", type=float, default=0.0, help="its sample standard deviation (n - 1)")
    ap.add_argument("--old-n", type=int, help="its number of runs")
    ap.add_argument("--threshold", type=float, default=0.005, help="required improvement in nats/token (default 0.005)")
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    ap.add_argument("--bpb", action="store_true", help="compare val_bpb (bar converted from nats), for runs of different tokenizers")
    a = ap.parse_args(argv)
    if (a.old is None) == (a.old_mean is None):
        ap.error("give either --old LOG... or --old-mean X --old-std S --old-n N")
    if a.old_mean is not None and a.old_n is None:
        ap.error("--old-mean needs --old-n (and --old-std unless --old-n is 1)")
    if a.old_mean is not None and a.old_n > 1 and a.old_std <= 0:
        ap.error("--old-std must be positive when --old-n > 1")
    if a.old_mean is not None and a.bpb:
        ap.error("--bpb needs --old LOG... (the logs give the val_loss/val_bpb ratio)")
    warn = lambda m: print(m, file=sys.stderr)  # noqa: E731
    new = read_side(a.new, "new", warn)
    key, threshold, note = "val_loss", a.threshold, ""
    if a.old:
        old = read_side(a.old, "old", warn)
        key, threshold, note = units(new, old, a.threshold, a.bpb)
        o_mean, o_std = mean_std([getattr(lg, key) for lg in old])
        o_n = len(old)
        kinds = {lg.metric_kind for lg in old} ^ {lg.metric_kind for lg in new}
        if kinds:
            warn(f"warning: old and new logs use different kinds of metric ({', '.join(sorted(kinds))})")
    else:
        old, o_mean, o_std, o_n = [], a.old_mean, a.old_std, a.old_n
    r = welch([getattr(lg, key) for lg in new], o_mean, o_std, o_n, threshold)
    unit = "nats/token" if key == "val_loss" else "bits/byte"
    if note:
        print(f"note: {note}")
    for side, logs, m, s, n in (("new", new, r["new_mean"], r["new_std"], r["new_n"]), ("old", old, o_mean, r["old_std"], o_n)):
        vals = " ".join(f"{getattr(lg, key):.6f}" for lg in logs)
        metric = f" {', '.join(sorted({f'{lg.metric_name} ({lg.metric_kind})' for lg in logs}))}" if logs else ""
        print(f"{side}: n={n} mean {key}={m:.6f} std={s:.6f} {unit}{metric}" + (f"  [{vals}]" if vals else ""))
    print(f"improvement: {r['improvement']:.6f} {unit} (old - new); required > {threshold:.6g}")
    print(f"test: one-sided Welch t-test (scipy), H0: improvement <= {threshold:.6g} vs H1: improvement > {threshold:.6g} ({key}, {unit})")
    print(f"t={r['t']:.4f} df={r['df']:.2f} se={r['se']:.6f} p={r['p']:.3g}")
    ok = r["p"] < a.alpha
    print(f"verdict: {'SIGNIFICANT' if ok else 'NOT significant'} (p {'<' if ok else '>='} {a.alpha})")
    return 0 if ok else 1


if __name__ == "__main__":
    cli(main)
