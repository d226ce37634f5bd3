#!/usr/bin/env python3
"""Build a record folder from the logs of finished runs, right by construction.

Writes records/track_<track>/YYYY-MM-DD_<name>/ (or --out) with:
  train_gpt.py      the exact script text the logs recorded, byte for byte (--pack: a tools/pack_code.py
                    self-extracting copy of it; --minify: a self-extracting copy of it without docstrings, comments
                    and blank lines; bytes_code and bytes_total then count the packed file. Shipped readable, the code
                    counts as the logs count it: their compressed code size when they state one, else the file)
  train_seed<S>.log each log, unchanged
  submission.json   author, github_id, name, blurb, date, track, val_loss, val_bpb (means over the logs of the
                    submission metric: final_ttt_exact, else final_sliding_exact, else final_roundtrip_exact),
                    val_loss_std,
                    val_bpb_std (sample std, n - 1), bytes_total (largest code + artifact over the logs),
                    bytes_code, code_sizes (readable, packed, minified_packed: tools/pack_code.py's sizes of the
                    script), seeds, seed_results, metric, hardware, pytorch_version
  README.md         the facts (result, per-seed table, configuration, reproduce command) and `<!-- AUTHOR: -->`
                    places for your prose
  requirements.txt  the third-party packages the script imports (torch/numpy pinned to the logged versions)

Refuses: logs without the `==== code:` block of this project's train_gpt.py, unfinished or failed runs, eval-only
runs, repeated seeds, logs of different scripts (sha256 of the logged code) or configurations. The configuration
is every logged hyperparameter except seed, run_id, the machine paths (data_path, tokenizer_path, log_dir,
artifact) and the log cadence (train_log_every, val_loss_every), plus the number of validation tokens. The folder is
assembled in a temporary sibling, checked with tools/check_record.py --strict and renamed into place only if no rule
gives an error or a warning; an existing folder is never overwritten. It prints the script's three sizes.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.check_record import check, failing, report  # noqa: E402
from data.common import UserError, cli  # noqa: E402
from tools.logparse import LIMIT, TRACKS, Log, config_diff, fmt, is_config, mean_std  # noqa: E402
from tools.pack_code import pack, sizes, unpack  # noqa: E402


def load_logs(paths: list[str]) -> list[Log]:
    logs, seen = [], {}
    for path in paths:
        lg = Log(path)
        why = ("holds no '==== code:' block (make_record needs a log written by this project's train_gpt.py)" if lg.format != "this"
               else f"is a failed run ({lg.error})" if lg.error
               else "is an EVAL_ONLY run, not a training run" if lg.hparams.get("eval_only", "0") != "0"
               else "has no final score line (did the run finish?)" if lg.val_bpb is None
               else "has no artifact size line" if lg.artifact_bytes is None
               else "has no seed" if lg.seed is None else None)
        if why:
            raise UserError(f"{path} {why}")
        if lg.raw in seen:
            raise UserError(f"{path} and {seen[lg.raw]} are the same log")
        seen[lg.raw] = path
        logs.append(lg)
    seeds = [lg.seed for lg in logs]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"repeated seed in {seeds}: each log must be an independent seed")
    for lg in logs[1:]:
        if lg.code_sha != logs[0].code_sha:
            raise UserError(f"{lg.path} and {logs[0].path} were written by different scripts "
                            f"(sha256 {lg.code_sha[:12]} vs {logs[0].code_sha[:12]})")
        if lg.config != logs[0].config:
            raise UserError(f"{lg.path} and {logs[0].path} ran different configurations: {config_diff(logs[0], lg)}")
    return sorted(logs, key=lambda lg: lg.seed)


def requirements(src: bytes, versions: dict) -> str:
    """Third-party top-level imports of the script; ones guarded by `except ImportError` are listed as optional."""
    tree = ast.parse(src)
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or "ImportError" in ast.unparse(h.type) or "ModuleNotFoundError" in ast.unparse(h.type) for h in node.handlers):
            optional |= {id(n) for b in node.body for n in ast.walk(b)}
    mods = {}
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for n in names:
            top = n.split(".")[0]
            if top not in sys.stdlib_module_names and top != "__future__":
                mods[top] = mods.get(top, True) and id(node) in optional
    dists = importlib.metadata.packages_distributions()
    lines = ["# third-party packages train_gpt.py imports (torch/numpy: the versions the logs recorded)"]
    for top, opt in sorted(mods.items(), key=lambda x: (x[1], x[0])):
        dist = (dists.get(top) or [top])[0]
        pin = versions.get(top, "").split("+")[0]
        lines.append(f"# optional, used when importable: {dist}" if opt else f"{dist}=={pin}" if pin else dist)
    return "\n".join(lines) + "\n"


def script_defaults(path: str, hp: dict) -> dict | None:
    """The logged script's own defaults for this preset/SMOKE (importing it has no side effects), or None."""
    try:
        spec = importlib.util.spec_from_file_location("_record_script", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return {k.lower(): str(v) for k, v in mod.parse_hparams({"PRESET": hp.get("preset", "record"), "SMOKE": hp.get("smoke", "0")}).items()}
    except Exception:  # an older or foreign script: no reproduce diff, the README lists every hyperparameter anyway
        return None


def readme(a, logs, sub, code: bytes, plain: bytes, defaults: dict | None, counted: int) -> str:
    lg0, n = logs[0], len(logs)
    hp = lg0.hparams
    smoke = hp.get("smoke", "0") != "0"
    ml, sl = mean_std([lg.val_loss for lg in logs])
    mb, sb = mean_std([lg.val_bpb for lg in logs])
    rows = "\n".join(
        f"| {lg.seed} | {fmt(lg.val_loss)} | {fmt(lg.val_bpb)} | {fmt(lg.final('pre_quant_exact'))} | {fmt(lg.final('final_roundtrip_exact'))} "
        f"| {lg.steps} | {lg.train_ms / 1000:.1f} | {fmt(lg.step_avg_ms, 2)} | {lg.artifact_bytes:,} | {lg.artifact_bytes + counted:,} "
        f"| [{sub['seed_results'][str(lg.seed)]['log']}]({sub['seed_results'][str(lg.seed)]['log']}) |" for lg in logs)
    env = {}
    if defaults is not None:
        env = {k.upper(): v for k, v in hp.items() if is_config(k) and k not in ("preset", "smoke") and defaults.get(k) != v}
    pre = " ".join([f"PRESET={hp['preset']}"] * (hp.get("preset", "record") != "record") + ["SMOKE=1"] * smoke
                   + [f"{k}={v}" for k, v in env.items()])
    world = lg0.world_size or 1
    launcher = f"torchrun --standalone --nproc_per_node={world} train_gpt.py" if world > 1 else "python train_gpt.py"
    packed = (f"; a self-extracting {'minified ' if a.minify else ''}packed copy (tools/pack_code.py{' --minify' if a.minify else ''}) "
              f"of the {len(plain):,}-byte source the logs recorded" if code != plain else "")
    cs = sub["code_sizes"]
    packed += (f"; counted as {counted:,} bytes, the compressed code size the logs state" if counted != len(code) else "")
    packed += f" (tools/pack_code.py: {cs['readable']:,} readable, {cs['packed']:,} packed, {cs['minified_packed']:,} minified+packed)"
    hps = "\n".join(f"{k}:{v}" for k, v in hp.items() if k not in ("run_id", "seed"))
    f = lg0.info
    return f"""# {a.name}

**Track** `{a.track}` · **Author** {a.author} ([@{a.github_id}](https://github.com/{a.github_id})) · **Date** {a.date}
{chr(10) + "> **This is a CPU SMOKE run of the tiny configuration (`SMOKE=1`): an example of the record format, not a competitive result.**" + chr(10) if smoke else ""}
<!-- AUTHOR: one paragraph: what is new in this submission and why it helps. -->

## Result

**val_bpb {mb:.8f}** (`{lg0.metric_name}`, mean of {n} seed{'s' * (n > 1)}{f', sample std {sb:.8f}' if n > 1 else ''}) ·
val_loss {ml:.8f} nats/token{f' (std {sl:.8f})' if n > 1 else ''} · largest submission {sub['bytes_total']:,} bytes
(code {counted:,} + artifact; limit {LIMIT:,})

| seed | val_loss | val_bpb | pre-quant val_bpb | round-trip val_bpb | steps | train s | ms/step | artifact bytes | total bytes | log |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}

## Configuration

- `train_gpt.py`: {len(code):,} bytes{packed}; sha256 of the logged code `{lg0.code_sha}`
- model: {int(float(f.get('model_params', 0))):,} parameters; features `{f.get('features', '?')}`
- data: {f.get('train_shards', '?')} training shard(s), {f.get('val_tokens', '?')} validation tokens scored
- hardware: {sub['hardware']}; python {lg0.versions.get('python', '?')}, torch {lg0.versions.get('torch', '?')}
- every hyperparameter as logged (identical in all logs except the seed):

<details><summary>hyperparameters</summary>

```
{hps}
```
</details>

## What changed

<!-- AUTHOR: the changes against the record this builds on, each with its measured effect. -->

## Significance

<!-- AUTHOR: paste the output of `python tools/significance.py --new train_seed*.log --old <current record's logs>` -->

## Reproduce

From this folder, with `DATA_PATH` and `TOKENIZER_PATH` pointing at the data the logs name ({hp.get('data_path', '?')}, {hp.get('tokenizer_path', '?')}):

```bash
pip install -r requirements.txt
{chr(10).join(f"RUN_ID=seed{lg.seed} SEED={lg.seed} {pre + ' ' if pre else ''}{launcher}" for lg in logs)}
```
{'' if defaults is not None else chr(10) + '(the script exposes no parse_hparams: set every hyperparameter listed above)' + chr(10)}
## Files

- `train_gpt.py`: the script the logs recorded{' (packed)' if packed else ''}
- {', '.join(f'`{r["log"]}`' for r in sub['seed_results'].values())}: the logs train_gpt.py wrote
- `submission.json`: leaderboard metadata; `requirements.txt`: packages

Folder made by `tools/make_record.py` and checked by `tools/check_record.py`.
"""


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name.strip()).strip("_.")
    if not s:
        raise UserError(f"--name {name!r} has no usable characters for a folder name")
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", metavar="LOG", help="training logs written by train_gpt.py (one per seed)")
    ap.add_argument("--name", required=True, help="short description; the folder is YYYY-MM-DD_<name> (spaces -> _)")
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--blurb", help="one-sentence summary for submission.json (default: generated from the facts)")
    ap.add_argument("--track", choices=TRACKS, default=TRACKS[0], help="default 10min_16mb")
    ap.add_argument("--date", help="YYYY-MM-DD (default: the date --out's name starts with, else today)")
    ap.add_argument("--out", help="folder to create (default records/track_<track>/<date>_<name>/)")
    ap.add_argument("--pack", action="store_true", help="ship a self-extracting compressed train_gpt.py (tools/pack_code.py)")
    ap.add_argument("--minify", action="store_true", help="ship a self-extracting compressed train_gpt.py without docstrings, "
                    "comments and blank lines (tools/pack_code.py --minify; the smallest count)")
    a = ap.parse_args(argv)
    m = re.match(r"\d{4}-\d{2}-\d{2}(?=_)", os.path.basename(os.path.normpath(a.out or "")))
    a.date = a.date or (m.group() if m else datetime.date.today().isoformat())
    try:
        datetime.date.fromisoformat(a.date)
    except ValueError:
        ap.error(f"--date {a.date!r} is not YYYY-MM-DD")
    logs = load_logs(a.logs)
    lg0 = logs[0]
    plain = lg0.code
    source = plain if unpack(plain) is None else unpack(plain)
    code = plain if not (a.pack or a.minify) or unpack(plain) is not None else pack(plain, lg0.code_name, minified=a.minify)
    three = sizes(source, lg0.code_name)
    stated = {lg.code_sizes.get("compressed") for lg in logs}
    counted = stated.pop() if code == plain and len(stated) == 1 and None not in stated else len(code)
    print(f"code: {three['readable']:,} bytes readable, {three['packed']:,} packed, {three['minified']:,} minified+packed "
          f"(tools/pack_code.py); ships {len(code):,} bytes, counts {counted:,}"
          + ("" if counted != len(code) else "" if code != plain else "; --minify would count " + f"{three['minified']:,}"))
    out = os.path.abspath(a.out or os.path.join(ROOT, "records", f"track_{a.track}", f"{a.date}_{slug(a.name)}"))
    if os.path.exists(out):
        raise UserError(f"{out} already exists; remove it or choose another --name/--out")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    ml, sl = mean_std([lg.val_loss for lg in logs])
    mb, sb = mean_std([lg.val_bpb for lg in logs])
    hw = f"{lg0.world_size or 1}x {lg0.device or 'unknown device'}"
    results = {str(lg.seed): dict(
        val_loss=lg.val_loss, val_bpb=lg.val_bpb, pre_quant_val_bpb=lg.final("pre_quant_exact"),
        roundtrip_val_bpb=lg.final("final_roundtrip_exact"), steps=lg.steps, train_time_ms=lg.train_ms,
        step_avg_ms=lg.step_avg_ms, bytes_artifact=lg.artifact_bytes, bytes_total=lg.artifact_bytes + counted,
        log=f"train_seed{lg.seed}.log") for lg in logs}
    hp = lg0.hparams
    blurb = a.blurb or (f"{'SMOKE (CPU, tiny) run' if hp.get('smoke', '0') != '0' else 'train_gpt.py'}, preset {hp.get('preset', '?')}: "
                        f"{hp.get('num_layers', '?')} layers x {hp.get('model_dim', '?')}, {lg0.steps} steps; {lg0.metric_name} "
                        f"val_bpb {mb:.4f}" + (f" +- {sb:.4f} over {len(logs)} seeds" if len(logs) > 1 else "") + ".")
    sub = dict(author=a.author, github_id=a.github_id, name=a.name, blurb=blurb, date=a.date, track=a.track,
               val_loss=round(ml, 8), val_bpb=round(mb, 8))
    if len(logs) > 1:
        sub.update(val_loss_std=round(sl, 8), val_bpb_std=round(sb, 8))
    sub.update(bytes_total=max(r["bytes_total"] for r in results.values()), bytes_code=counted,
               code_sizes=dict(readable=three["readable"], packed=three["packed"], minified_packed=three["minified"]), metric=lg0.metric_name,
               seeds=[lg.seed for lg in logs], seed_results=results, hardware=hw, pytorch_version=lg0.versions.get("torch"))
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(out))
    try:
        with open(os.path.join(stage, "train_gpt.py"), "wb") as f:
            f.write(code)
        for lg in logs:
            shutil.copyfile(lg.path, os.path.join(stage, results[str(lg.seed)]["log"]))
        with open(os.path.join(stage, "submission.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(sub, indent=2) + "\n")
        with open(os.path.join(stage, "requirements.txt"), "w", encoding="utf-8") as f:
            f.write(requirements(plain if unpack(plain) is None else unpack(plain), {k: v for k, v in lg0.versions.items()}))
        defaults = script_defaults(os.path.join(stage, "train_gpt.py"), hp)
        with open(os.path.join(stage, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme(a, logs, sub, code, plain, defaults, counted))
        res, notes = check(stage, a.track, os.path.basename(out))
        if not report(res, notes, strict=True):
            raise UserError(f"{out} not written: {len(failing(res, strict=True))} rule(s) give an error or a warning (above)")
        os.chmod(stage, 0o755)
        os.rename(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote {os.path.relpath(out)}: {len(logs)} log(s), val_bpb {mb:.8f}, bytes_total {sub['bytes_total']:,} "
          f"(code {counted:,}{f', packed from {len(plain):,}' if code != plain else ''})")
    return 0


if __name__ == "__main__":
    cli(main)
