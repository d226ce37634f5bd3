"""check_record's severities: every error and every warning rule has a synthetic folder (tests/fixtures/logs/ era
logs through test_logformats.make_folder) that triggers it, at its level, with the exit status it must give; each test
fails if its rule is removed or changes level. Also: what counts as the same configuration, how code is counted."""
import json
import re

import pytest

from test_logformats import SEEDS, make_folder, rules, script_of, tool

ERA = "era4_phased_ttt"  # Hyperparameters: block, quantized_ttt_phased, compressed code size 34,000 (readable 160,000)


def _replace(old, new, only=None):
    """An edit for make_folder: replace `old` by `new` in every log (or only in seed `only`'s)."""
    def edit(seed, text):
        assert old in text, old
        return text.replace(old, new) if only in (None, seed) else text
    return edit


def _sub(folder, **changes):
    p = folder / "submission.json"
    s = json.loads(p.read_text())
    s.update(changes)
    p.write_text(json.dumps({k: v for k, v in s.items() if v is not None}))


# case: (rule, level, detail, how to make the folder)
ERRORS = {
    "files": ("missing README.md", lambda root: _unlink(make_folder(root, ERA), "README.md")),
    "submission.json": ("does not parse", lambda root: _write(make_folder(root, ERA), "submission.json", "{not json")),
    "logs": ("no log reports a final score", lambda root: _unscored(make_folder(root, ERA))),
    "compiles": ("SyntaxError", lambda root: _write(make_folder(root, ERA), "train_gpt.py", "def broken(:\n")),
    "size": ("over the limit", lambda root: make_folder(root, ERA, edit=_replace("quantized+pergroup: 15870000", "quantized+pergroup: 15990000", 42))),
    "traced": ("val_bpb 1.04 is on no log line", lambda root: make_folder(root, ERA, sub=dict(val_bpb=1.04))),
    "validation": ("validation data used before scoring", lambda root: make_folder(root, ERA, edit=_replace(
        "peak memory", "gptq:calibrating with 64 batches (validation data)...\npeak memory"))),
    "train time": ("trained 640.00 s", lambda root: make_folder(root, ERA, edit=_replace("train_time: 599020ms", "train_time: 640000ms", 42))),
    "eval time": ("final evaluation took 700.0 s", lambda root: make_folder(root, ERA, edit=_replace("total_eval_time:470.0s", "total_eval_time:700.0s"))),
}
WARNINGS = {
    "fields": ("missing or invalid: github_id", lambda root: make_folder(root, ERA, sub=dict(github_id=None))),
    "folder": ("the name must be YYYY-MM-DD_Name", lambda root: make_folder(root, ERA, name="MyRecord")),
    "logs": ("train.log: no final score line (not counted)", lambda root: _write(make_folder(root, ERA), "train.log", "step:1/10 train_loss:5.0\n")),
    "code": ("not the file that ran", lambda root: _write(make_folder(root, ERA), "train_gpt.py", script_of(35000).decode())),
    "same run": ("train_seq_len: 2048 vs 1024", lambda root: make_folder(root, ERA, edit=_replace("train_seq_len: 2048", "train_seq_len: 1024", 2024))),
    "seeds": ("the README asks for at least 3", lambda root: make_folder(root, ERA, seeds=SEEDS[:2])),
    "agrees": ("bytes_total 15900000 but the largest seed's total is 15904000", lambda root: make_folder(root, ERA, sub=dict(bytes_total=15900000))),
    "hardware": ("world_size 4", lambda root: make_folder(root, ERA, edit=_replace("world_size: 8", "world_size: 4"))),
}


def _unscored(folder):
    """Every log cut before its final scores (the runs did not finish)."""
    for p in folder.glob("*.log"):
        p.write_text(re.sub(r"^(quantized_ttt_phased|diagnostic quantized) .*\n", "", p.read_text(), flags=re.M))
    return folder


def _unlink(folder, name):
    (folder / name).unlink()
    return folder


def _write(folder, name, text):
    (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("rule", sorted(ERRORS))
def test_each_error_rule_rejects_with_exit_1(tmp_path, rule):
    detail, make = ERRORS[rule]
    folder = make(tmp_path)
    r, _ = rules(folder)
    assert r[rule][0] == "error" and detail in r[rule][1], r.get(rule)
    rc, out, _ = tool("check_record", folder)
    assert rc == 1 and f"ERROR {rule}: " in out and out.rstrip().endswith("REJECTED")


@pytest.mark.parametrize("rule", sorted(WARNINGS))
def test_each_warning_rule_warns_with_exit_0_and_rejects_with_strict(tmp_path, rule):
    detail, make = WARNINGS[rule]
    folder = make(tmp_path)
    r, _ = rules(folder)
    assert r[rule][0] == "warning" and detail in r[rule][1], r.get(rule)
    assert not [k for k, (lv, _) in r.items() if lv == "error"], r  # a warning alone: the folder is accepted
    rc, out, _ = tool("check_record", folder)
    assert rc == 0 and f"WARN {rule}: " in out and "ACCEPTED with" in out
    rc, out, _ = tool("check_record", folder, "--strict")
    assert rc == 1 and "REJECTED (--strict: warnings count as errors)" in out


def test_the_unedited_folder_passes_every_rule(tmp_path):
    """The base of every case above: all PASS, so each case's finding comes from its edit alone."""
    r, notes = rules(make_folder(tmp_path, ERA))
    assert all(lv == "ok" for lv, _ in r.values()), r
    assert set(ERRORS) - {"submission.json"} <= set(r) and set(WARNINGS) <= set(r)


def test_run_identity_and_paths_are_ignored_and_listed_once(tmp_path):
    """Fields other scripts log per run (logfile, run_id, artifact_dir, datasets_dir, model paths) differ between the
    seeds of one configuration: not a finding; they are named once on the rule's line."""
    def edit(seed, text):
        return text.replace("  data_dir: ./data/\n", f"  data_dir: ./data/\n  artifact_dir: runs/s{seed}\n  datasets_dir: /w{seed}/data\n"
                            f"  logfile: logs/{seed}.txt\n  run_id: {seed}-abc\n  model_path: runs/s{seed}/final_model.pt\n"
                            f"  train_files: /w{seed}/train_*.bin\n")
    r, _ = rules(make_folder(tmp_path, ERA, edit=edit))
    assert r["same run"][0] == "ok", r["same run"]
    assert r["same run"][1].endswith("(ignored, as run identity or paths: artifact_dir, datasets_dir, logfile, model_path, run_id, "
                                     "train_files)")


def test_time_limit_scales_with_fewer_gpus(tmp_path):
    """2 GPUs for 2,400 s is the 8-GPU budget (a warning for the hardware, not an error for the time); 3,000 s is over."""
    two = _replace("world_size: 8", "world_size: 2")
    def edit(train_ms):
        return lambda s, t: two(s, t).replace("max_wallclock_seconds: 600.0", "max_wallclock_seconds: 2400.0").replace(
            "train_time: 599020ms", f"train_time: {train_ms}ms")
    r, _ = rules(make_folder(tmp_path / "a", ERA, edit=edit(2399000)))
    assert r["train time"][0] == "ok" and "2 GPUs: limit 2400 s" in r["train time"][1] and r["hardware"][0] == "warning"
    r, _ = rules(make_folder(tmp_path / "b", ERA, edit=edit(3000000)))
    assert r["train time"][0] == "error" and "over 2400 s" in r["train time"][1]


def test_code_counts_the_compressed_size_the_log_states(tmp_path):
    """Readable 160,000 + artifact 15,900,000 is over 16,000,000; the log counts 34,000 compressed: that counts, and
    the checker says so. A log that states no compressed size is counted by its own code size."""
    folder = make_folder(tmp_path, ERA, edit=_replace("quantized+pergroup: 15870000", "quantized+pergroup: 15900000"))
    (folder / "train_gpt.py").write_bytes(script_of(160000))  # the readable script, as later records ship it
    r, notes = rules(folder)
    assert r["size"][0] == "ok" and "largest total 15,934,000 = code 34,000" in r["size"][1]
    assert "compressed code size its log states" in r["size"][1] and any("compressed size the logs state" in n for n in notes)
    assert r["code"][0] == "ok" and r["agrees"][0] == "ok"
    plain = make_folder(tmp_path / "p", ERA, edit=lambda s, t: t.replace("Code size (compressed): 34000 bytes\n", "").replace(
        "Code size (uncompressed): 160000", "Code size: 160000").replace("quantized+pergroup: 15870000", "quantized+pergroup: 15900000"),
        sub=dict(bytes_code=160000))
    r, _ = rules(plain)
    assert r["size"][0] == "error" and "code 160,000" in r["size"][1]


def test_traced_scores_come_from_any_log_line_or_mean(tmp_path):
    """A score reported from one seed, a val_bpb written under val_loss, or the mean of eval-only reruns in a
    subfolder is traced (a warning at most); a number on no log line is an error."""
    one = make_folder(tmp_path / "a", ERA, sub=dict(val_bpb=1.06046))  # seed 2024's score (1.06045788), 5 digits
    r, _ = rules(one)
    assert r["traced"][0] == "ok" and "train_seed2024.log: quantized_ttt_phased" in r["traced"][1] and r["agrees"][0] == "warning"
    swapped = make_folder(tmp_path / "b", ERA, sub=dict(val_bpb=None, val_loss=1.06))
    r, _ = rules(swapped)
    assert r["traced"][0] == "ok" and r["agrees"][0] == "warning" and "val_loss 1.06 is a val_bpb value" in r["agrees"][1]
    rerun = make_folder(tmp_path / "c", ERA, sub=dict(val_bpb=1.058))
    (rerun / "ttt").mkdir()
    for i, v in enumerate((1.057, 1.058, 1.059)):
        (rerun / "ttt" / f"seed{i}.log").write_text(f"quantized_ttt_phased val_loss:2.3 val_bpb:{v} eval_time:400000ms\n")
    r, _ = rules(rerun)
    assert r["traced"][0] == "ok" and "logs in ttt/" in r["traced"][1]


def test_console_lines_with_a_unix_time_before_each_are_read(tmp_path):
    """Some records' logs are console captures with `1776142360.538 ` before every line: read as if it were not there."""
    from test_logformats import FIX
    from tools.logparse import Log
    text = (FIX / f"{ERA}.log").read_text()
    p = tmp_path / "train0.txt"
    p.write_text("".join(f"{1776142360.5 + i / 1000:.3f} {line}\n" for i, line in enumerate(text.splitlines())))
    lg, ref = Log(str(p)), Log(str(FIX / f"{ERA}.log"))
    assert (lg.hparams, lg.val_bpb, lg.code_sizes, lg.train_ms, lg.eval_seconds) == (ref.hparams, ref.val_bpb, ref.code_sizes, ref.train_ms,
                                                                                     ref.eval_seconds)
