#!/usr/bin/env python3
"""Check a record folder against every rule a reviewer checks; one line per rule, PASS or FAIL.

Rules: the required files (README.md, submission.json or the only submission*.json, the training script, at least one
training log); the folder
name (YYYY-MM-DD_Name) and track; submission.json parses, has author, github_id, name and val_bpb (what the upstream README
requires), and blurb, date, val_loss, bytes_total, bytes_code (or `code_bytes`, as some records spell it) well-typed
where present; every log finished with a final score; the shipped script
equals the code recorded in each log (byte for byte, or a tools/pack_code.py copy of it); logs that hold no code are
checked by their logged code size (`Code size: N bytes`, `Code size (compressed): N`): a shipped script of another
size is not the one that ran; the script compiles; all logs ran the same script and configuration; distinct seeds
(byte-identical copies of a log count once); submission.json agrees with the logs (val_loss/val_bpb = mean over logs
within the JSON's printed precision, integers exactly, bytes_code = the shipped script, bytes_total = the largest
seed's total, per-seed results); code bytes + logged artifact bytes <= 16,000,000 for every log, and no log printed
its own size line ending in OVER.
Record track only: at least 3 seeds; training <= 600 s with a cap of at most 600 s (the script checks the clock after
a step, so the step in flight plus one more may pass the cap: up to two step times are accepted); final evaluation
<= 600 s on the full validation split; 8 GPUs, H100 SXM (PCIe/NVL or other cards are flagged), not a SMOKE run; and,
given --previous LOG..., the one-sided Welch test of tools/significance.py: >= 0.005 nats better with p < 0.01.

The submission metric of a log is its last evaluation, test-time-trained > sliding > round trip, under whatever name
(final_int8_zlib_roundtrip_exact, quantized_sliding_window, quantized_ttt_phased, final_sliding_exact, ...).
The track is read from the parent folder (records/track_<track>/), else submission.json's "track" (upstream
spellings such as "track_10min_16mb" or "non-record" included), else --track. Exit status 0 only when every rule passes.
"""
from __future__ import annotations

import argparse
import datetime
import decimal
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import UserError, cli  # noqa: E402
from tools.logparse import CODE_HEAD_PREFIX, LIMIT, RECORD_SECONDS, TRACKS, Log, config_diff, mean_std, unique_logs  # noqa: E402
from tools.pack_code import unpack  # noqa: E402
from tools.significance import read_side, units, welch  # noqa: E402

# submission.json: what the upstream README requires ("your name, GitHub ID, val_bpb"), then fields checked when present
REQUIRED = dict(author=str, github_id=str, name=str, val_bpb=float)
OPTIONAL = dict(blurb=str, date=str, val_loss=float, bytes_total=int, bytes_code=int, code_bytes=int)
CODE_KEYS = ("bytes_code", "code_bytes")  # submission.json spellings of the code size
MIN_SEEDS = 3  # record track
OVERSHOOT_STEPS = 2  # record track: the step in flight at the cap, and the one a check after the step lets through
_LOGLIKE = re.compile(re.escape(CODE_HEAD_PREFIX.encode()) + rb"|^(?:step:\s?)?\d+/\d+ |val_bpb[:=]", re.M)


def find_logs(folder: str) -> list[str]:
    """Text files that look like training logs, in the folder and its logs/ subfolder."""
    out = []
    for p in sorted(glob.glob(os.path.join(folder, "*")) + glob.glob(os.path.join(folder, "logs", "*"))):
        if os.path.isfile(p) and p.endswith((".log", ".txt")) and os.path.basename(p) != "requirements.txt":
            with open(p, "rb") as f:
                if _LOGLIKE.search(f.read()):
                    out.append(p)
    return out


def find_script(folder: str, logged_sizes: set[int]) -> tuple[str | None, str]:
    """The training script: train_gpt.py, else the one .py whose size a log recorded, else the only .py -> (path, note)."""
    p = os.path.join(folder, "train_gpt.py")
    if os.path.isfile(p):
        return p, ""
    pys = sorted(glob.glob(os.path.join(folder, "*.py")))
    hit = [q for q in pys if os.path.getsize(q) in logged_sizes]
    pick = hit[0] if len(hit) == 1 else pys[0] if len(pys) == 1 else None
    return pick, (f"the script is {os.path.basename(pick)} (not train_gpt.py)" if pick else "")


def find_submission(folder: str) -> tuple[str | None, str]:
    """submission.json, else the only submission*.json (a record that named it e.g. submission_binary.json) -> (path, note)."""
    p = os.path.join(folder, "submission.json")
    if os.path.isfile(p):
        return p, ""
    alt = sorted(glob.glob(os.path.join(folder, "submission*.json")))
    if len(alt) == 1:
        return alt[0], f"the submission metadata is {os.path.basename(alt[0])} (not submission.json)"
    return None, ""


def _close(json_value, actual) -> bool:
    """Equal within the precision the JSON number was written with (plus float noise); integers exactly."""
    if actual is None or isinstance(json_value, bool) or not isinstance(json_value, decimal.Decimal | int):
        return False
    exp = json_value.as_tuple().exponent if isinstance(json_value, decimal.Decimal) else None
    return abs(float(json_value) - actual) <= (0.5 * 10.0 ** min(exp, 0) if exp is not None else 0.0) + 1e-9


def normalize_track(v) -> str | None:
    """Upstream spellings of a track: 10min_16mb, track_10min_16mb, record, non-record, non_record_16mb, ..."""
    if not isinstance(v, str):
        return None
    t = v.strip().lower().removeprefix("records/").removeprefix("track_").replace("-", "_")
    if "non" in t and "record" in t or "unlimited" in t:
        return "non_record_16mb"
    return "10min_16mb" if "10min" in t or t in ("record", "main", "leaderboard") else None


def track_of(folder: str, sub: dict | None, override: str | None) -> tuple[str, str]:
    parent = os.path.basename(os.path.dirname(os.path.abspath(folder)))
    if override:
        return override, "--track"
    if parent.startswith("track_") and parent[6:] in TRACKS:
        return parent[6:], f"folder {parent}"
    if sub and normalize_track(sub.get("track")):
        return normalize_track(sub["track"]), "submission.json"
    return TRACKS[0], "assumed (no track folder or field)"


def check(folder: str, track: str | None = None, name: str | None = None, previous: list[str] | None = None
          ) -> tuple[list[tuple[bool, str, str]], list[str]]:
    """All rules for `folder` -> ([(ok, rule, detail)], notes). `name` overrides the folder's name (staging);
    `previous` are the logs of the record to beat (record track)."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder")
    res, notes = [], []
    rule = lambda ok, r, d: res.append((bool(ok), r, d))  # noqa: E731
    p = lambda f: os.path.join(folder, f)  # noqa: E731
    paths = find_logs(folder)
    logs, broken = [], []
    for path in paths:
        try:
            lg = Log(path)
        except UserError as e:
            broken.append(str(e))
            continue
        if lg.error or lg.val_bpb is None:
            broken.append(f"{lg.name}: " + (f"run failed: {lg.error}" if lg.error else "no final score line"))
        else:
            logs.append(lg)
    logs, dup_notes = unique_logs(logs)
    notes += dup_notes
    script_path, script_note = find_script(folder, {lg.logged_code_bytes for lg in logs if lg.logged_code_bytes})
    if script_note:
        notes.append(script_note)
    sub_path, sub_note = find_submission(folder)
    if sub_note:
        notes.append(sub_note)
    missing = (["README.md"] if not os.path.isfile(p("README.md")) else []) + ([] if sub_path else ["submission.json"]) + (
        [] if script_path else ["train_gpt.py"])
    rule(not missing and paths, "files", f"missing {', '.join(missing + ([] if paths else ['training log']))}" if missing or not paths
         else f"README.md {os.path.basename(sub_path)} {os.path.basename(script_path)} + {len(paths)} log(s)")

    sub, raw_sub = None, None
    if sub_path:
        try:
            with open(sub_path, encoding="utf-8") as f:
                raw_sub = json.load(f, parse_float=decimal.Decimal)
            sub = json.loads(json.dumps(raw_sub, default=float)) if isinstance(raw_sub, dict) else None
            if sub is None:
                rule(False, "submission.json", "is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            rule(False, "submission.json", f"does not parse: {e}")
    code_key = next((k for k in CODE_KEYS if sub and k in sub), CODE_KEYS[0])
    if sub is not None:
        bad = [k for k, t in {**REQUIRED, **OPTIONAL}.items() if (k in sub or k in REQUIRED) and (k not in sub or not (
            isinstance(sub[k], t) or (t is float and isinstance(sub[k], int))) or isinstance(sub[k], bool) or (t is str and not sub[k].strip()))]
        rule(not bad, "submission.json", f"missing or invalid: {', '.join(bad)}" if bad else "parses; author, github_id, name, val_bpb "
             f"present; {', '.join(k for k in OPTIONAL if k in sub) or 'no optional field'} well-typed")

    trk, src = track_of(folder, sub, track)
    base = name or os.path.basename(os.path.abspath(folder))
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2})_[A-Za-z0-9][\w.+-]*", base)
    try:
        date_ok = bool(m) and datetime.date.fromisoformat(m.group(1)) is not None
    except ValueError:
        date_ok = False
    conflict = sub and sub.get("track") is not None and normalize_track(sub.get("track")) != trk
    rule(date_ok and not conflict, "folder", f"{base}: track {trk} ({src})" + ("" if date_ok else "; name must be YYYY-MM-DD_Name")
         + (f"; submission.json says track {sub.get('track')}" if conflict else ""))

    rule(logs and not broken, "logs", "; ".join(broken) if broken else
         ", ".join(f"{lg.name}: {lg.metric_name} ({lg.metric_kind}) val_bpb {lg.val_bpb:.8f}" for lg in logs) or "none")

    script = None
    if script_path:
        with open(script_path, "rb") as f:
            script = f.read()
    if script is not None and logs:
        inner, bad, how = unpack(script), [], set()
        for lg in logs:
            if lg.code is not None:
                if lg.code == script:
                    how.add("identical")
                elif inner is not None and lg.code == inner:
                    how.add("packed copy of the logged code")
                elif unpack(lg.code) is not None and unpack(lg.code) == script:
                    how.add("unpacked source of the logged packed code")
                else:
                    bad.append(f"{lg.name} logged different code ({len(lg.code)} bytes, sha256 {lg.code_sha[:12]}; "
                               f"the script has {len(script)} bytes)")
            elif lg.code_sizes:
                if len(script) in lg.code_sizes.values():
                    how.add("size only: the log holds no code text")
                else:
                    sizes = ", ".join(f"{v} ({k})" for k, v in lg.code_sizes.items())
                    bad.append(f"{lg.name} logged code size {sizes}, the shipped script has {len(script)} bytes: not the file that ran")
            else:
                bad.append(f"{lg.name} records neither the code nor its size")
        rule(not bad, "code", "; ".join(bad) if bad else f"the script matches every log ({', '.join(sorted(how))})")
    elif script is not None:
        rule(False, "code", "no log to compare the script with")
    if script is not None:
        errs = []
        for label, src_ in (("the script", script), ("its packed source", unpack(script))):
            if src_ is not None:
                try:
                    compile(src_, label, "exec", dont_inherit=True)
                except (SyntaxError, ValueError) as e:
                    errs.append(f"{label}: {e.__class__.__name__}: {e}")
        rule(not errs, "compiles", "; ".join(errs) if errs else "the script compiles" + (" (and its packed source)" if unpack(script) else ""))

    if len(logs) > 1:
        diff = [f"{lg.name} ran different code" for lg in logs[1:] if lg.code_sha != logs[0].code_sha]
        diff += [f"{lg.name} vs {logs[0].name}: {config_diff(logs[0], lg)}" for lg in logs[1:] if lg.config != logs[0].config]
        rule(not diff, "same run", "; ".join(diff) if diff else f"{len(logs)} logs share script and configuration")
    seeds = [lg.seed for lg in logs]
    dup = sorted({s for s in seeds if s is not None and seeds.count(s) > 1})
    if logs:
        few = trk == "10min_16mb" and len(logs) < MIN_SEEDS
        rule(not dup and not few, "seeds", f"repeated seed(s) {dup}" if dup else
             f"{len(logs)} run(s), seeds {seeds}" + (f": the record track needs at least {MIN_SEEDS}" if few else ""))

    # code bytes: the shipped script; without one, the size the logs recorded
    code_len = len(script) if script is not None else max((lg.logged_code_bytes for lg in logs if lg.logged_code_bytes), default=None)
    totals = [(lg.artifact_bytes + code_len, lg) for lg in logs if lg.artifact_bytes is not None] if code_len is not None else []
    if logs and code_len is not None:
        no_art = [lg.name for lg in logs if lg.artifact_bytes is None]
        over = [f"{lg.name} says: {o}" for lg in logs for o in lg.over_lines]
        big = max(totals, key=lambda x: x[0]) if totals else None
        what = "code" if script is not None else "logged code (no script)"
        rule(not no_art and not over and big and big[0] <= LIMIT, "size",
             f"no artifact size in {', '.join(no_art)}" if no_art else
             f"largest total {big[0]:,} = {what} {code_len:,} + artifact {big[1].artifact_bytes:,} ({big[1].name}); limit {LIMIT:,}"
             + (f"; {'; '.join(over)}" if over else ""))

    if sub is not None and logs:
        bad = []
        for key in ("val_loss", "val_bpb"):
            vals = [getattr(lg, key) for lg in logs]
            mean = mean_std(vals)[0]
            if key in raw_sub and not _close(raw_sub[key], mean):
                bad.append(f"{key} {raw_sub[key]!s} but the logs' mean is {mean:.8f}")
        if script is not None and code_key in sub and sub[code_key] != len(script):
            bad.append(f"{code_key} {sub[code_key]} but the script has {len(script)} bytes")
        if isinstance(sub.get("bytes_total"), int) and totals:
            allowed = {max(t for t, _ in totals)} | ({max(lg.logged_total for lg in logs if lg.logged_total)} if any(lg.logged_total for lg in logs) else set())
            if sub["bytes_total"] not in allowed:
                bad.append(f"bytes_total {sub['bytes_total']} but the largest seed's total is {' or '.join(map(str, sorted(allowed)))}")
        per = raw_sub.get("seed_results")
        if isinstance(per, dict):
            by_seed = {str(lg.seed): lg for lg in logs}
            for s, r in per.items():
                lg = by_seed.get(str(s))
                if lg is None:
                    bad.append(f"seed_results has seed {s}, no log has it")
                elif isinstance(r, dict):
                    bad += [f"seed {s}: {k} {r[k]} but its log says {getattr(lg, k)}" for k in ("val_loss", "val_bpb")
                            if k in r and not _close(r[k], getattr(lg, k))]
            bad += [f"seed {s} has a log but no seed_results entry" for s in by_seed if s not in {str(k) for k in per}]
        if isinstance(sub.get("seeds"), list) and sorted(map(str, sub["seeds"])) != sorted(str(lg.seed) for lg in logs):
            bad.append(f"seeds {sub['seeds']} but the logs have {seeds}")
        rule(not bad, "agrees", "; ".join(bad) if bad else "submission.json matches the logs (scores, bytes, seeds)")

    if trk == "10min_16mb" and logs:
        t_bad, t_max = [], 0.0
        for lg in logs:
            cap = lg.wallclock_cap
            t, avg = lg.train_ms, lg.step_avg_ms or 0.0
            if t is None:
                t_bad.append(f"{lg.name}: no training time logged")
                continue
            t_max = max(t_max, t / 1000)
            if cap is not None and not 0 < cap <= RECORD_SECONDS:
                t_bad.append(f"{lg.name}: max_wallclock_seconds {cap:g} (must be in (0, {RECORD_SECONDS:.0f}])")
            if t - OVERSHOOT_STEPS * avg > 1000 * RECORD_SECONDS:
                t_bad.append(f"{lg.name}: trained {t / 1000:.2f} s ({avg:.1f} ms/step)")
        rule(not t_bad, "train time", "; ".join(t_bad) if t_bad else
             f"longest {t_max:.2f} s <= {RECORD_SECONDS:.0f} s (+ up to {OVERSHOOT_STEPS} steps past the cap)")
        e_bad, e_max = [], None
        for lg in logs:
            e = lg.eval_seconds
            if e is not None:
                e_max = max(e_max or 0.0, e)
                if e > RECORD_SECONDS:
                    e_bad.append(f"{lg.name}: final evaluation took {e:.1f} s")
            if lg.hparams.get("val_max_tokens", "0") != "0":
                e_bad.append(f"{lg.name}: val_max_tokens {lg.hparams['val_max_tokens']} (not the full validation split)")
        rule(not e_bad, "eval time", "; ".join(e_bad) if e_bad else
             (f"longest final evaluation {e_max:.1f} s <= {RECORD_SECONDS:.0f} s" if e_max is not None else "not logged") + ", full validation split")
        h_bad = []
        for lg in logs:
            if lg.world_size is not None and lg.world_size != 8:
                h_bad.append(f"{lg.name}: world_size {lg.world_size}")
            d = lg.device
            if d is not None and ("H100" not in d or re.search(r"pcie|nvl", d, re.I)):
                h_bad.append(f"{lg.name}: device {d} (not an H100 SXM)")
            if lg.hparams.get("smoke", "0") != "0":
                h_bad.append(f"{lg.name}: a SMOKE run")
        rule(not h_bad, "hardware", "; ".join(h_bad) + " (the record track is 8xH100 SXM; use track non_record_16mb)" if h_bad else
             f"8 GPUs{', ' + logs[0].device if logs[0].device else ''}")
        if previous:
            old = read_side(previous, "previous record", notes.append)
            key, thr, note = units(logs, old, 0.005, bpb=False)
            r = welch([getattr(lg, key) for lg in logs], *mean_std([getattr(lg, key) for lg in old]), len(old), thr)
            rule(r["p"] < 0.01, "beats previous", f"{key} {r['new_mean']:.6f} vs {r['old_mean']:.6f}: improvement {r['improvement']:.6f} "
                 f"(bar {thr}), Welch t={r['t']:.3f} df={r['df']:.2f} p={r['p']:.3g} (needs < 0.01)")
        else:
            notes.append("the 0.005-nat bar against the current record was not tested: give --previous LOG...")
    elif logs:
        ts = [lg.train_ms / 1000 for lg in logs if lg.train_ms is not None]
        rule(True, "time and hardware", f"no limits on track {trk}" + (f" (longest training {max(ts):.1f} s)" if ts else ""))

    if os.path.isfile(p("README.md")):
        with open(p("README.md"), encoding="utf-8", errors="replace") as f:
            n = f.read().count("<!-- AUTHOR:")
        if n:
            notes.append(f"README.md still has {n} '<!-- AUTHOR: ... -->' place(s) for your prose")
    return res, notes


def report(res, notes, out=sys.stdout) -> bool:
    for ok, r, d in res:
        print(f"{'PASS' if ok else 'FAIL'} {r}: {d}", file=out)
    for n in notes:
        print(f"note: {n}", file=out)
    good = sum(ok for ok, _, _ in res)
    print(f"{good}/{len(res)} rules pass", file=out)
    return good == len(res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="the record folder, e.g. records/track_10min_16mb/2026-03-20_MyIdea")
    ap.add_argument("--track", choices=TRACKS, help="the track, when the folder is not under records/track_<track>/")
    ap.add_argument("--previous", nargs="+", metavar="LOG", help="logs of the current record: test the 0.005-nat bar (record track)")
    a = ap.parse_args(argv)
    return 0 if report(*check(a.folder, a.track, previous=a.previous)) else 1


if __name__ == "__main__":
    cli(main)
