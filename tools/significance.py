#!/usr/bin/env python3
"""Is the new result a record? Two one-sided Welch t-tests, computed by SciPy, each labelled:

  practice test  how reviewers accepted records (in date order): improvement > 0 with p < 0.25, over >= 3 seeds of
                 ONE configuration, against the previous leaderboard record's seeds. The default verdict.
  README rule    what the challenge README asks: improvement >= 0.005 nats with p < 0.01 (met by fewer than 15 % of
                 the merged records). The verdict with --strict.

Both run on val_loss, the natural-log cross-entropy per token (nats/token) of each log's submission metric (the last
evaluation the log reports: test-time-trained > sliding window > round trip, whatever the line is called):

    improvement d = mean(old) - mean(new)            (positive = new is better)
    H0: d <= THRESHOLD        H1: d > THRESHOLD      (practice: 0; README: 0.005 nats, --threshold)
    t  = (d - THRESHOLD) / sqrt(s_new^2/n_new + s_old^2/n_old)           (s = sample std, n - 1)
    df = Welch-Satterthwaite;  p = P(T_df >= t)      passes when p < ALPHA (practice: 0.25; README: 0.01, --alpha)

p comes from scipy.stats.ttest_ind_from_stats(equal_var=False, alternative="greater"). A single old run (or
--old-n 1) is a fixed reference: scipy.stats.ttest_1samp on the new runs (df = n_new - 1).

val_loss is per token, so it only compares runs of the same tokenizer. The ratio val_loss / val_bpb (ln 2 x bytes per
token) tells tokenizers apart: when old and new differ by more than 0.5 %, the test is refused unless --bpb is given,
which runs it on val_bpb with the bar converted through the old side's ratio (0.005 nats/token of the current record).
Byte-identical duplicate logs count once (with a warning). Exit status 0 only when the chosen test passes.
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
# The two acceptance tests: (label, threshold in nats/token, alpha, seeds the new side needs)
PRACTICE = ("practice test (how reviewers accepted records)", 0.0, 0.25, 3)
README_RULE = ("README rule", 0.005, 0.01, 2)


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


def acceptance(new: list[float], old_mean: float, old_std: float, old_n: int, scale: float = 1.0,
               readme: tuple = README_RULE) -> list[dict]:
    """Both tests (PRACTICE, then `readme`) on the same numbers; thresholds in nats/token times `scale` (1 / the old
    side's val_loss/val_bpb ratio when comparing val_bpb). Each result: label, threshold, alpha, passed, why, and the
    welch() numbers (absent when the new side has too few runs for that test)."""
    out = []
    for label, thr, alpha, need in (PRACTICE, readme):
        r = dict(label=label, threshold=thr * scale, alpha=alpha, need=need)
        if len(new) < need:
            r.update(passed=False, why=f"needs >= {need} seeds of one configuration, has {len(new)}")
        else:
            r.update(welch(new, old_mean, old_std, old_n, thr * scale))
            r.update(passed=r["p"] < alpha, why="")
        out.append(r)
    return out


def describe(r: dict, unit: str = "nats/token") -> str:
    """One line: the test, its bar, its numbers, PASS/FAIL."""
    bar = f"improvement > {r['threshold']:.6g} {unit} with p < {r['alpha']:g}"
    nums = f"t={r['t']:.4f} df={r['df']:.2f} se={r['se']:.6f} p={r['p']:.3g}" if "p" in r else r["why"]
    return f"{r['label']}: one-sided Welch, {bar}: {nums} -> {'PASS' if r['passed'] else 'FAIL'}"


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
    """('val_loss' | 'val_bpb', scale, note): the thresholds in nats/token times scale are in the compared unit (1, or
    1 / the old side's val_loss/val_bpb with bpb). Refuses different tokenizers unless bpb."""
    rn, ro = (mean_std([lg.nats_per_bpb for lg in side])[0] for side in (new, old))
    same = abs(rn - ro) <= RATIO_TOLERANCE * ro
    if bpb:
        return "val_bpb", 1 / ro, (f"compared in val_bpb; the {threshold:g} nats/token bar is {threshold / ro:.6f} bpb through the "
                                   f"old runs' val_loss/val_bpb = {ro:.5f}" + ("" if same else f" (new runs: {rn:.5f}, another tokenizer)"))
    if not same:
        raise UserError(f"old and new runs used different tokenizers (val_loss/val_bpb {ro:.5f} vs {rn:.5f}): val_loss per token "
                        "does not compare; give --bpb to test val_bpb with the bar converted")
    return "val_loss", 1.0, ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", nargs="+", required=True, metavar="LOG", help="logs of the new submission (one per seed)")
    ap.add_argument("--old", nargs="+", metavar="LOG", help="logs of the current record")
    ap.add_argument("--old-mean", type=float, help="current record's mean val_loss (nats/token), instead of --old")
    ap.add_argument("--old-std", type=float, default=0.0, help="its sample standard deviation (n - 1)")
    ap.add_argument("--old-n", type=int, help="its number of runs")
    ap.add_argument("--threshold", type=float, default=README_RULE[1], help="README rule: improvement in nats/token (default 0.005)")
    ap.add_argument("--alpha", type=float, default=README_RULE[2], help="README rule: significance level (default 0.01)")
    ap.add_argument("--strict", action="store_true", help="exit status from the README rule instead of the practice test")
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
    if len(new) < 2:
        raise UserError(f"need at least 2 new runs for a t-test, got {len(new)}")
    key, scale, note = "val_loss", 1.0, ""
    if a.old:
        old = read_side(a.old, "old", warn)
        key, scale, note = units(new, old, a.threshold, a.bpb)
        o_mean, o_std = mean_std([getattr(lg, key) for lg in old])
        o_n = len(old)
        kinds = {lg.metric_kind for lg in old} ^ {lg.metric_kind for lg in new}
        if kinds:
            warn(f"warning: old and new logs use different kinds of metric ({', '.join(sorted(kinds))})")
    else:
        old, o_mean, o_std, o_n = [], a.old_mean, a.old_std, a.old_n
    readme = (f"README rule ({a.threshold:g} nats, p < {a.alpha:g})", a.threshold, a.alpha, 2)
    practice, rule = acceptance([getattr(lg, key) for lg in new], o_mean, o_std, o_n, scale, readme)
    unit = "nats/token" if key == "val_loss" else "bits/byte"
    if note:
        print(f"note: {note}")
    w = practice if "p" in practice else rule
    for side, logs, m, s, n in (("new", new, w["new_mean"], w["new_std"], w["new_n"]), ("old", old, o_mean, w["old_std"], o_n)):
        vals = " ".join(f"{getattr(lg, key):.6f}" for lg in logs)
        metric = f" {', '.join(sorted({f'{lg.metric_name} ({lg.metric_kind})' for lg in logs}))}" if logs else ""
        print(f"{side}: n={n} mean {key}={m:.6f} std={s:.6f} {unit}{metric}" + (f"  [{vals}]" if vals else ""))
    print(f"improvement: {w['improvement']:.6f} {unit} (old - new) ({key}, {unit})")
    print(describe(practice, unit))
    print(describe(rule, unit))
    chosen = rule if a.strict else practice
    print(f"verdict: {'SIGNIFICANT' if chosen['passed'] else 'NOT significant'} by the {chosen['label']}"
          + ("" if a.strict else "; --strict uses the README rule"))
    return 0 if chosen["passed"] else 1


if __name__ == "__main__":
    cli(main)
