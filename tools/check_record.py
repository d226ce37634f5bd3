#!/usr/bin/env python3
"""Check a record folder the way reviewers judged the accepted public records: one line per rule, each PASS, ERROR or
WARN, then notes. Exit status 1 only when a rule gives an ERROR (with --strict, a WARN too); 0 otherwise.

ERROR (the run would be rejected):
  files       README.md, submission.json (or the only submission*.json), the training script or a training log missing
  submission.json  does not parse, or is not a JSON object
  logs        no log reports a final score
  compiles    the script (or a packed file's source) does not compile
  size        code + artifact > 16,000,000 bytes for a log, counted as reviewers counted: the compressed code size the
              log states (later records ship readable code and count a minified, compressed copy), else the code size
              the log states, else the shipped script; or a log printed its own size line ending in OVER
  traced      submission.json's val_bpb (val_loss) is found on no log line: not the logs' mean of any score, not the
              mean of any subset of the logs, not any score line of any log in the folder (within its printed digits)
  validation  a log says validation data calibrated or trained the model before it was scored
  train time  (record track) trained past the cap (600 s on 8 GPUs; N GPUs: 600 x 8 / N) by more than two steps, or a
              cap above it
  eval time   (record track) final evaluation over 600 s (same scaling), or not on the full validation split
  beats previous  (with --previous) the practice test fails: one-sided Welch over the seeds, p < 0.25 against the
              previous record's seeds; with --strict the README rule: >= 0.005 nats with p < 0.01
WARN (accepted by reviewers, but worth fixing):
  fields      submission.json lacks author, github_id, name or val_bpb, or a field has the wrong type
  folder      the name is not YYYY-MM-DD_Name, or the track in submission.json disagrees with the folder
  logs        a log without a final score or with a run error (not counted)
  code        the shipped script is not the code (or the code size) the logs recorded
  same run    the logs ran different code or a different configuration; only settings that change the result are
              compared (run identity and paths are ignored, and listed once)
  seeds       a repeated seed; fewer than 3 seeds on the record track
  agrees      submission.json's scores, bytes or seeds differ from the logs (rounding, one seed reported, ...)
  hardware    (record track) not 8 GPUs, not H100 SXM, or a SMOKE run
Notes: how code was counted, duplicate logs, names other than train_gpt.py/submission.json, a test not run.

The submission metric of a log is its last evaluation, test-time-trained > sliding > round trip, under whatever name
(final_int8_zlib_roundtrip_exact, quantized_sliding_window, quantized_ttt_phased, final_sliding_exact, ...).
The track is read from the parent folder (records/track_<track>/), else submission.json's "track" (upstream
spellings such as "track_10min_16mb" or "non-record" included), else --track.
"""
from __future__ import annotations

import argparse
import datetime
import decimal
import glob
import itertools
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import UserError, cli  # noqa: E402
from tools.logparse import (CODE_HEAD_PREFIX, KIND_NAMES, KINDS, LIMIT, RECORD_SECONDS, TRACKS, Log, config_diff, ignored_differences,  # noqa: E402
                            mean_std, unique_logs)
from tools.pack_code import same_program, unpack  # noqa: E402
from tools.significance import README_RULE, acceptance, describe, read_side, units  # noqa: E402

# submission.json: what the upstream README requires ("your name, GitHub ID, val_bpb"), then fields checked when present
REQUIRED = dict(author=str, github_id=str, name=str, val_bpb=float)
OPTIONAL = dict(blurb=str, date=str, val_loss=float, bytes_total=int, bytes_code=int, code_bytes=int)
CODE_KEYS = ("bytes_code", "code_bytes")  # submission.json spellings of the code size
SCORE_KEYS = dict(val_bpb=("val_bpb", "mean_val_bpb"), val_loss=("val_loss", "mean_val_loss"))  # where records put the score
MIN_SEEDS = 3  # record track, what the README asks
RECORD_GPUS = 8
OVERSHOOT_STEPS = 2  # record track: the step in flight at the cap, and the one a check after the step lets through
MAX_SUBSET_LOGS = 12  # traced: means over subsets of the logs are tried up to this many logs
LEVELS = dict(ok="PASS", warning="WARN", error="ERROR")
# a log line or setting saying validation data calibrated or trained the model (before scoring it)
_VAL_USE = re.compile(r"(?i)\b(?:calibrat\w*|hessians?|pre[-_ ]?quant(?:ization)?[-_ ]ttt)\b[^\n]*?(?:\(|\bon |\bfrom |\busing |source[:=]\s*)"
                      r"(?:the )?(?:val|validation|fineweb_val\w*)(?: data| tokens| split| set)?\b(?![_.])")
_LOGLIKE = re.compile(re.escape(CODE_HEAD_PREFIX.encode()) + rb"|^(?:step:\s?)?\d+/\d+ |val_bpb[:=]", re.M)


def _loglike(paths) -> list[str]:
    out = []
    for p in sorted(paths):
        if os.path.isfile(p) and p.endswith((".log", ".txt")) and os.path.basename(p) != "requirements.txt":
            with open(p, "rb") as f:
                if _LOGLIKE.search(f.read()):
                    out.append(p)
    return out


def find_logs(folder: str) -> list[str]:
    """Text files that look like training logs, in the folder and its logs/ subfolder."""
    return _loglike(glob.glob(os.path.join(folder, "*")) + glob.glob(os.path.join(folder, "logs", "*")))


def _other_logs(folder: str, skip: set[str]) -> list[tuple[str, list[Log]]]:
    """Log-like files anywhere under the folder but not in `skip` (eval-only reruns in a subfolder, ablations), parsed,
    grouped by folder: [(relative folder, logs)]."""
    groups = {}
    for p in _loglike(glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)):
        if os.path.abspath(p) in skip:
            continue
        try:
            lg = Log(p)
        except UserError:
            continue
        lg.name = os.path.relpath(p, folder)
        groups.setdefault(os.path.relpath(os.path.dirname(p), folder), []).append(lg)
    return sorted(groups.items())


def _digits(v) -> float:
    """One unit in the last digit a JSON number was written with (0 for an integer: exactly)."""
    return 10.0 ** min(v.as_tuple().exponent, 0) if isinstance(v, decimal.Decimal) else 0.0


def _trace(value, groups: list[tuple[str, list[Log]]], key: str) -> str | None:
    """Where a submission.json score comes from (None: nowhere), within one unit of its last written digit: for each
    group of logs (the training logs first, then other logs by folder), the mean of their submission metric or of any
    kind of score, or the mean of a subset of them; else any score line of any log."""
    if isinstance(value, bool) or not isinstance(value, decimal.Decimal | int):
        return None
    tol, x = _digits(value) + 1e-9, float(value)
    near = lambda c: c is not None and abs(c - x) <= tol  # noqa: E731
    for label, logs in groups:
        logs = [lg for lg in logs if lg.metric is not None]
        vals = [getattr(lg, key) for lg in logs]
        if vals and near(mean_std(vals)[0]):
            return f"the mean submission metric over the {len(vals)} {label}"
        for kind in KINDS:
            got = [s[key] for s in (lg.score(kind) for lg in logs) if s]
            if len(got) == len(logs) and got and near(mean_std(got)[0]):
                return f"the mean {KIND_NAMES[kind]} score over the {label}"
        if 2 < len(logs) <= MAX_SUBSET_LOGS:
            for r in range(len(logs) - 1, 1, -1):
                for sub in itertools.combinations(logs, r):
                    if near(mean_std([getattr(lg, key) for lg in sub])[0]):
                        return f"the mean of {', '.join(lg.name for lg in sub)}"
    hit = next(((lg, s) for _, logs in groups for lg in logs for s in lg.scores if near(s[key])), None)
    return f"{hit[0].name}: {hit[1]['name']}" if hit else None


def _val_use(lg: Log) -> list[str]:
    """Lines or settings of a log that say validation data calibrated or trained the model."""
    hits = [f"{k}: {v}" for k, v in lg.hparams.items() if re.search(r"calib|hessian", k) and re.fullmatch(r"(?i)val\w*|validation", v.strip())]
    return hits + [line.strip() for line in lg.lines if _VAL_USE.search(line)]


class Findings:
    """The rules' results: (level, rule, detail), level ok / warning / error."""

    def __init__(self):
        self.res = []

    def add(self, rule: str, ok: str, errors=(), warnings=()):
        """One line for a rule: its errors, else its warnings, else the ok detail."""
        errors, warnings = [e for e in errors if e], [w for w in warnings if w]
        level = "error" if errors else "warning" if warnings else "ok"
        self.res.append((level, rule, "; ".join(errors + warnings) if errors or warnings else ok))


def previous_logs(args: list[str]) -> list[str]:
    """--previous: a record folder (its training logs) or log files."""
    out = []
    for a in args:
        if os.path.isdir(a):
            found = find_logs(a)
            if not found:
                raise UserError(f"--previous {a}: no training log in that folder")
            out += found
        else:
            out.append(a)
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


def check(folder: str, track: str | None = None, name: str | None = None, previous: list[str] | None = None,
          strict: bool = False) -> tuple[list[tuple[str, str, str]], list[str]]:
    """All rules for `folder` -> ([(level, rule, detail)], notes); level is ok, warning or error. `name` overrides the
    folder's name (staging); `previous` are the logs (or the folder) of the record to beat (record track); `strict`
    tests it by the README rule instead of the practice test."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder")
    f, notes = Findings(), []
    p = lambda x: os.path.join(folder, x)  # noqa: E731
    paths = find_logs(folder)
    logs, broken = [], []
    for path in paths:
        try:
            lg = Log(path)
        except UserError as e:
            broken.append(str(e))
            continue
        if lg.error or lg.val_bpb is None:
            broken.append(f"{lg.name}: " + (f"run failed: {lg.error}" if lg.error else "no final score line") + " (not counted)")
        else:
            logs.append(lg)
    logs, dup_notes = unique_logs(logs)
    notes += dup_notes
    script_path, script_note = find_script(folder, {v for lg in logs for v in lg.code_sizes.values()} |
                                           {lg.logged_code_bytes for lg in logs if lg.logged_code_bytes})
    sub_path, sub_note = find_submission(folder)
    notes += [n for n in (script_note, sub_note) if n]
    missing = (["README.md"] if not os.path.isfile(p("README.md")) else []) + ([] if sub_path else ["submission.json"]) + (
        [] if script_path else ["train_gpt.py"]) + ([] if paths else ["training log"])
    f.add("files", f"README.md {os.path.basename(sub_path or '')} {os.path.basename(script_path or '')} + {len(paths)} log(s)",
          errors=[f"missing {', '.join(missing)}" if missing else ""])

    sub, raw_sub = None, None
    if sub_path:
        try:
            with open(sub_path, encoding="utf-8") as fh:
                raw_sub = json.load(fh, parse_float=decimal.Decimal)
            sub = json.loads(json.dumps(raw_sub, default=float)) if isinstance(raw_sub, dict) else None
            f.add("submission.json", "parses", errors=["" if sub is not None else "is not a JSON object"])
        except (ValueError, UnicodeDecodeError) as e:
            f.add("submission.json", "", errors=[f"does not parse: {e}"])
    code_key = next((k for k in CODE_KEYS if sub and k in sub), CODE_KEYS[0])
    if sub is not None:
        bad = [k for k, t in {**REQUIRED, **OPTIONAL}.items() if (k in sub or k in REQUIRED) and (k not in sub or not (
            isinstance(sub[k], t) or (t is float and isinstance(sub[k], int))) or isinstance(sub[k], bool) or (t is str and not sub[k].strip()))]
        f.add("fields", f"author, github_id, name, val_bpb present; {', '.join(k for k in OPTIONAL if k in sub) or 'no optional field'} well-typed",
              warnings=[f"missing or invalid: {', '.join(bad)} (the README asks for author, github_id, name, val_bpb)" if bad else ""])

    trk, src = track_of(folder, sub, track)
    base = name or os.path.basename(os.path.abspath(folder))
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2})_[A-Za-z0-9][\w.+-]*", base)
    try:
        date_ok = bool(m) and datetime.date.fromisoformat(m.group(1)) is not None
    except ValueError:
        date_ok = False
    conflict = sub and sub.get("track") is not None and normalize_track(sub.get("track")) != trk
    f.add("folder", f"{base}: track {trk} ({src})", warnings=[
        "" if date_ok else f"{base}: the name must be YYYY-MM-DD_Name (letters, digits, _ . + -)",
        f"submission.json says track {sub.get('track')}, the folder {trk}" if conflict else ""])

    f.add("logs", ", ".join(f"{lg.name}: {lg.metric_name} ({lg.metric_kind}) val_bpb {lg.val_bpb:.8f}" for lg in logs),
          errors=["" if logs else "no log reports a final score: the submission's metric cannot come from a log"
                  + (f" ({'; '.join(broken)})" if broken else "")], warnings=broken if logs else [])

    script = None
    if script_path:
        with open(script_path, "rb") as fh:
            script = fh.read()
    inner = unpack(script) if script is not None else None
    if script is not None and logs:
        bad, how = [], set()
        for lg in logs:
            if lg.code is not None:
                if lg.code == script:
                    how.add("identical")
                elif inner is not None and lg.code == inner:
                    how.add("packed copy of the logged code")
                elif inner is not None and same_program(lg.code, inner):
                    how.add("minified packed copy of the logged code")
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
        f.add("code", f"the script matches every log ({', '.join(sorted(how))})", warnings=bad)
    elif script is not None:
        f.add("code", "", warnings=["no log to compare the script with"])
    if script is not None:
        errs = []
        for label, src_ in (("the script", script), ("its packed source", inner)):
            if src_ is not None:
                try:
                    compile(src_, label, "exec", dont_inherit=True)
                except (SyntaxError, ValueError) as e:
                    errs.append(f"{label}: {e.__class__.__name__}: {e}")
        f.add("compiles", "the script compiles" + (" (and its packed source)" if inner else ""), errors=errs)

    if len(logs) > 1:
        diff = [f"{lg.name} ran different code" for lg in logs[1:] if lg.code_sha != logs[0].code_sha]
        diff += [f"{lg.name} vs {logs[0].name}: {config_diff(logs[0], lg)}" for lg in logs[1:] if lg.config != logs[0].config]
        ign = ignored_differences(logs)
        f.add("same run", f"{len(logs)} logs share script and configuration"
              + (f" (ignored, as run identity or paths: {', '.join(ign)})" if ign else ""), warnings=diff)
    seeds = [lg.seed for lg in logs]
    dup = sorted({s for s in seeds if s is not None and seeds.count(s) > 1})
    if logs:
        few = trk == "10min_16mb" and len(logs) < MIN_SEEDS
        f.add("seeds", f"{len(logs)} run(s), seeds {seeds}", warnings=[
            f"repeated seed(s) {dup} in {seeds}" if dup else "",
            f"{len(logs)} run(s), seeds {seeds}: the README asks for at least {MIN_SEEDS} on the record track" if few else ""])

    # size, counted per log as reviewers counted it
    totals, no_art, how_counted = [], [], set()
    for lg in logs:
        if "compressed" in lg.code_sizes:
            code, how = lg.code_sizes["compressed"], "the compressed code size its log states"
        elif lg.logged_code_bytes is not None and (script is None or inner is None):
            code, how = lg.logged_code_bytes, "the code size its log states"
        elif script is not None:
            code, how = len(script), "the shipped script"
        else:
            code, how = None, ""
        if lg.artifact_bytes is None or code is None:
            no_art.append(lg.name)
            continue
        totals.append((lg.artifact_bytes + code, code, lg))
        how_counted.add(how)
    if logs:
        over = [f"{lg.name} says: {o}" for lg in logs for o in lg.over_lines]
        big = max(totals, key=lambda x: x[0]) if totals else None
        detail = (f"largest total {big[0]:,} = code {big[1]:,} + artifact {big[2].artifact_bytes:,} ({big[2].name}); limit {LIMIT:,}; "
                  f"code counted as {' / '.join(sorted(how_counted))}") if big else ""
        f.add("size", detail, errors=[f"{detail}: over the limit" if big and big[0] > LIMIT else "", *over,
                                      f"no artifact or code size in {', '.join(no_art)}" if no_art else ""])
        if "the compressed code size its log states" in how_counted:
            notes.append("code counted as the compressed size the logs state (what reviewers counted for records that ship "
                         "readable code and log a minified, compressed copy's size)")

    if sub is not None and logs:
        groups = [("logs", logs)] + [(f"logs in {d}/" if d != "." else "other logs in the folder", g) for d, g in
                                     _other_logs(folder, {os.path.abspath(x) for x in paths})]
        t_err, t_ok, a_bad = [], [], []
        for key, names in SCORE_KEYS.items():
            other = "val_loss" if key == "val_bpb" else "val_bpb"
            found = [(k, _trace(raw_sub[k], groups, key)) for k in names if k in raw_sub]
            swapped = [(k, _trace(raw_sub[k], groups, key)) for k in SCORE_KEYS[other] if k in raw_sub]
            k, where = next(((k, w) for k, w in found if w), found[0] if found else (None, None))
            if where is None and any(w for _, w in swapped):  # the other key holds this unit's value (val_loss: 1.14)
                k, where = next((k, w) for k, w in swapped if w)
                a_bad.append(f"{k} {raw_sub[k]} is a {key} value ({where})")
                t_ok.append(f"{key} {raw_sub[k]} (under {k}): {where}")
                continue
            if k is None:
                if key == "val_bpb":
                    t_err.append("submission.json states no val_bpb (nor mean_val_bpb) to trace")
                continue
            if where is None:
                if not any(_trace(raw_sub[k], groups, other) for k in names if k in raw_sub):
                    t_err.append(f"{k} {raw_sub[k]} is on no log line (logs' mean {mean_std([getattr(lg, key) for lg in logs])[0]:.8f}; "
                                 "nor any subset's mean or any score line within its digits)")
                continue
            t_ok.append(f"{k} {raw_sub[k]}: {where}")
            if k != key:
                a_bad.append(f"the score is under {k}, not {key}")
        f.add("traced", "; ".join(t_ok), errors=t_err)

        for key in ("val_loss", "val_bpb"):
            mean = mean_std([getattr(lg, key) for lg in logs])[0]
            if key in raw_sub and not _close(raw_sub[key], mean):
                a_bad.append(f"{key} {raw_sub[key]!s} but the logs' mean is {mean:.8f}")
        counted_codes = {c for _, c, _ in totals}
        if script is not None and code_key in sub and sub[code_key] != len(script) and sub[code_key] not in counted_codes:
            a_bad.append(f"{code_key} {sub[code_key]} but the script has {len(script)} bytes"
                         + (f" and the logs count {' or '.join(map(str, sorted(counted_codes)))}" if counted_codes - {len(script)} else ""))
        if isinstance(sub.get("bytes_total"), int) and totals:
            allowed = {max(t for t, _, _ in totals)} | ({max(lg.logged_total for lg in logs if lg.logged_total)} if any(lg.logged_total for lg in logs) else set())
            if sub["bytes_total"] not in allowed:
                a_bad.append(f"bytes_total {sub['bytes_total']} but the largest seed's total is {' or '.join(map(str, sorted(allowed)))}")
        per = raw_sub.get("seed_results")
        if isinstance(per, dict):
            by_seed = {str(lg.seed): lg for lg in logs}
            for s_, r in per.items():
                lg = by_seed.get(str(s_))
                if lg is None:
                    a_bad.append(f"seed_results has seed {s_}, no log has it")
                elif isinstance(r, dict):
                    a_bad += [f"seed {s_}: {k} {r[k]} but its log says {getattr(lg, k)}" for k in ("val_loss", "val_bpb")
                              if k in r and not _close(r[k], getattr(lg, k))]
            a_bad += [f"seed {s_} has a log but no seed_results entry" for s_ in by_seed if s_ not in {str(k) for k in per}]
        if isinstance(sub.get("seeds"), list) and sorted(map(str, sub["seeds"])) != sorted(str(lg.seed) for lg in logs):
            a_bad.append(f"seeds {sub['seeds']} but the logs have {seeds}")
        f.add("agrees", "submission.json matches the logs (scores, bytes, seeds)", warnings=a_bad)

    if logs:
        hits = [f"{lg.name}: {h}" for lg in logs for h in _val_use(lg)]
        f.add("validation", "no log says validation data calibrated or trained the model before scoring",
              errors=[f"validation data used before scoring: {h}" for h in hits[:3]])

    if trk == "10min_16mb" and logs:
        t_bad, t_warn, t_max = [], [], (0.0, "", RECORD_GPUS, RECORD_SECONDS)
        for lg in logs:
            cap = lg.wallclock_cap
            t, avg = lg.train_ms, lg.step_avg_ms or 0.0
            gpus = lg.world_size or RECORD_GPUS
            limit = RECORD_SECONDS * RECORD_GPUS / gpus if gpus < RECORD_GPUS else RECORD_SECONDS
            if t is None:
                t_warn.append(f"{lg.name}: no training time logged")
                continue
            t_max = max(t_max, (t / 1000, lg.name, gpus, limit))
            if cap is not None and not 0 < cap <= limit:
                t_bad.append(f"{lg.name}: max_wallclock_seconds {cap:g} (must be in (0, {limit:.0f}] on {gpus} GPUs)")
            if t - OVERSHOOT_STEPS * avg > 1000 * limit:
                t_bad.append(f"{lg.name}: trained {t / 1000:.2f} s ({avg:.1f} ms/step) on {gpus} GPUs, over {limit:.0f} s")
        f.add("train time", f"longest {t_max[0]:.2f} s ({t_max[1]}, {t_max[2]} GPUs: limit {t_max[3]:.0f} s, "
              f"{RECORD_SECONDS:.0f} s on {RECORD_GPUS} GPUs; + up to {OVERSHOOT_STEPS} steps past the cap)",
              errors=t_bad, warnings=t_warn)
        e_bad, e_max = [], None
        for lg in logs:
            e = lg.eval_seconds
            gpus = lg.world_size or RECORD_GPUS
            limit = RECORD_SECONDS * RECORD_GPUS / gpus if gpus < RECORD_GPUS else RECORD_SECONDS
            if e is not None:
                e_max = max(e_max or 0.0, e)
                if e > limit:
                    e_bad.append(f"{lg.name}: final evaluation took {e:.1f} s (limit {limit:.0f} s)")
            if lg.hparams.get("val_max_tokens", "0") != "0":
                e_bad.append(f"{lg.name}: val_max_tokens {lg.hparams['val_max_tokens']} (not the full validation split)")
        f.add("eval time", (f"longest final evaluation {e_max:.1f} s <= {RECORD_SECONDS:.0f} s" if e_max is not None else "not logged")
              + ", full validation split", errors=e_bad)
        h_bad = []
        for lg in logs:
            if lg.world_size is not None and lg.world_size != RECORD_GPUS:
                h_bad.append(f"{lg.name}: world_size {lg.world_size}")
            d = lg.device
            if d is not None and ("H100" not in d or re.search(r"pcie|nvl", d, re.I)):
                h_bad.append(f"{lg.name}: device {d} (not an H100 SXM)")
            if lg.hparams.get("smoke", "0") != "0":
                h_bad.append(f"{lg.name}: a SMOKE run")
        f.add("hardware", f"{RECORD_GPUS} GPUs{', ' + logs[0].device if logs[0].device else ''}",
              warnings=[f"{'; '.join(h_bad)} (the record track is 8xH100 SXM; else use track non_record_16mb)" if h_bad else ""])
        if previous:
            old = read_side(previous_logs(previous), "previous record", notes.append)
            key, scale, note = units(logs, old, README_RULE[1], bpb=False)
            o_mean, o_std = mean_std([getattr(lg, key) for lg in old])
            practice, rule = acceptance([getattr(lg, key) for lg in logs], o_mean, o_std, len(old), scale)
            chosen, other = (rule, practice) if strict else (practice, rule)
            f.add("beats previous", describe(chosen), errors=["" if chosen["passed"] else describe(chosen)])
            notes.append(f"{'practice test' if strict else 'README rule (--strict)'}: {describe(other)}")
        else:
            notes.append("the acceptance test against the current record was not run: give --previous FOLDER (or its logs)")
    elif logs:
        ts = [lg.train_ms / 1000 for lg in logs if lg.train_ms is not None]
        f.add("time and hardware", f"no limits on track {trk}" + (f" (longest training {max(ts):.1f} s)" if ts else ""))

    if os.path.isfile(p("README.md")):
        with open(p("README.md"), encoding="utf-8", errors="replace") as fh:
            n = fh.read().count("<!-- AUTHOR:")
        if n:
            notes.append(f"README.md still has {n} '<!-- AUTHOR: ... -->' place(s) for your prose")
    return f.res, notes


def failing(res, strict: bool = False) -> list[tuple[str, str, str]]:
    """The findings that reject the folder: errors, and with strict warnings too."""
    return [r for r in res if r[0] == "error" or (strict and r[0] == "warning")]


def report(res, notes, strict: bool = False, out=sys.stdout) -> bool:
    """Print one line per rule, the notes and a summary; True when nothing rejects the folder."""
    for level, r, d in res:
        print(f"{LEVELS[level]} {r}: {d}", file=out)
    for n in notes:
        print(f"note: {n}", file=out)
    n_err, n_warn = (sum(lv == x for lv, _, _ in res) for x in ("error", "warning"))
    bad = failing(res, strict)
    verdict = "REJECTED" if bad else "ACCEPTED" + (f" with {n_warn} warning(s)" if n_warn else "")
    print(f"{n_err} error(s), {n_warn} warning(s), {len(res) - n_err - n_warn} pass: {verdict}"
          + (" (--strict: warnings count as errors)" if strict and n_warn else ""), file=out)
    return not bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="the record folder, e.g. records/track_10min_16mb/2026-03-20_MyIdea")
    ap.add_argument("--track", choices=TRACKS, help="the track, when the folder is not under records/track_<track>/")
    ap.add_argument("--previous", nargs="+", metavar="DIR|LOG", help="the current record's folder (or its logs): run the "
                    "acceptance test (record track): the practice test, or with --strict the README rule")
    ap.add_argument("--strict", action="store_true", help="warnings count as errors, and --previous uses the README rule")
    a = ap.parse_args(argv)
    return 0 if report(*check(a.folder, a.track, previous=a.previous, strict=a.strict), strict=a.strict) else 1


if __name__ == "__main__":
    cli(main)
