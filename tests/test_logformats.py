"""The tools on every log format of the public records (tests/fixtures/logs/: synthetic logs, written for these tests,
in the shapes of the eras of openai/parameter-golf records): the parser's facts, check_record's rules as reviewers
apply them (each former false alarm now passes, each missed problem now fails), significance and plot_log."""
import json
import re
import shutil
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT
from tools import check_record, gpu_check, plot_log
from data.common import UserError
from tools.logparse import Log

FIX = ROOT / "tests" / "fixtures" / "logs"
SEEDS = ((1337, -0.001), (42, 0.0), (2024, 0.001))  # seed, val_loss shift (nats)
# per fixture: submission metric, its kind, val_loss, val_bpb, seed, train ms, steps, artifact, counted code, total, eval s
FACTS = {
    "era1_int8_roundtrip": ("final_int8_zlib_roundtrip_exact", "roundtrip", 2.072, 1.224, 1337, 600060, 13770, 15800000, 47000, 15847000, 1.4),
    "era2_sliding_window": ("final_int6_sliding_window_s64_exact", "sliding", 1.945, 1.152, 1337, 600010, 8795, 15600000, 52000, 15652000, 72.0),
    "era3_legal_ttt": ("legal_ttt_exact", "ttt", 1.888, 1.1182, 1337, 600090, 6975, 15880000, 17500, 15897500, 331.0),
    "era4_phased_ttt": ("quantized_ttt_phased", "ttt", 2.315, 1.06, 42, 599020, 4925, 15870000, 34000, 15904000, 470.0),
}
ERAS = sorted(FACTS)


def tool(name, *args):
    p = subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    return p.returncode, p.stdout, p.stderr


def seeded(text: str, seed: int, shift: float) -> str:
    """The fixture as another seed's run: seed lines replaced, exact scores shifted (val_bpb by the same ratio)."""
    text = re.sub(r"^(\s*seed:\s?)\d+$", lambda m: f"{m[1]}{seed}", text, flags=re.M)
    return re.sub(r"val_loss:(\d\.\d{8}) val_bpb:(\d\.\d{8})",
                  lambda m: f"val_loss:{float(m[1]) + shift:.8f} val_bpb:{float(m[2]) * (1 + shift / float(m[1])):.8f}", text)


def script_of(size: int) -> bytes:
    """A stand-in training script of exactly `size` bytes (it compiles)."""
    head = b'"""stand-in for the record\'s training script"""\nprint("train")\n'
    return head + b"#" * (size - len(head) - 1) + b"\n"


def make_folder(root, era, seeds=SEEDS, track="track_10min_16mb", name="2026-04-01_Era", edit=None, sub=None):
    """A record folder of one era: a log per seed (edit(seed, text) -> text), the stand-in script, README, submission.json."""
    folder = root / track / name
    folder.mkdir(parents=True)
    base = (FIX / f"{era}.log").read_text()
    logs = []
    for seed, shift in seeds:
        text = seeded(base, seed, shift)
        (folder / f"train_seed{seed}.log").write_text(edit(seed, text) if edit else text)
        logs.append(Log(str(folder / f"train_seed{seed}.log")))
    code = logs[0].logged_code_bytes
    (folder / "train_gpt.py").write_bytes(script_of(code))
    (folder / "README.md").write_text("A synthetic record folder.\n")
    s = dict(author="T. Ester", github_id="tester", name="Era", blurb="synthetic", date="2026-04-01",
             val_loss=round(statistics.mean(lg.val_loss for lg in logs), 8), val_bpb=round(statistics.mean(lg.val_bpb for lg in logs), 8),
             bytes_total=max(lg.artifact_bytes for lg in logs) + code, bytes_code=code, seeds=[s for s, _ in seeds])
    s.update(sub or {})
    (folder / "submission.json").write_text(json.dumps({k: v for k, v in s.items() if v is not None}))
    return folder


def rules(folder, **kw):
    """{rule: (level, detail)}, notes; level ok, warning or error."""
    res, notes = check_record.check(str(folder), **kw)
    return {r: (lv, d) for lv, r, d in res}, notes


def failed(folder, **kw):
    """The rules that do not pass (errors and warnings): {rule: detail}."""
    r, _ = rules(folder, **kw)
    return {k: d for k, (lv, d) in r.items() if lv != "ok"}


def all_pass(r) -> bool:
    return all(lv == "ok" for lv, _ in r.values())


# ----------------------------------------------------------------------------- the parser
@pytest.mark.parametrize("era", ERAS)
def test_every_era_is_parsed(era):
    name, kind, loss, bpb, seed, train_ms, steps, art, code, total, ev = FACTS[era]
    lg = Log(str(FIX / f"{era}.log"))
    assert (lg.metric_name, lg.metric_kind, lg.val_loss, lg.val_bpb, lg.seed) == (name, kind, loss, bpb, seed)
    assert (lg.train_ms, lg.steps, lg.artifact_bytes, lg.logged_code_bytes, lg.logged_total) == (train_ms, steps, art, code, total)
    assert lg.eval_seconds == pytest.approx(ev) and lg.world_size == 8 and lg.wallclock_cap == 600
    assert len(lg.train) >= 9 and all(p["loss"] is not None and p["time_ms"] > 0 for p in lg.train)
    assert lg.step_avg_ms == pytest.approx(train_ms / steps, rel=0.01)


def test_bare_step_lines_minutes_and_indented_hyperparameters():
    lg = Log(str(FIX / "era4_phased_ttt.log"))
    assert lg.train[0] == dict(step=500, total=20000.0, time_ms=60000.0, loss=pytest.approx(3.2 - 500 / 3000, abs=1e-4),
                               step_avg_ms=None, lr_mult=None)
    assert lg.hparams["seed"] == "42" and lg.hparams["vocab_size"] == "8192" and lg.config["ttt_enabled"] == "True"
    assert [p["step"] for p in lg.val] == [0, 4000] and lg.score("pre")["val_bpb"] == 1.065 and lg.final("roundtrip") == 1.073
    assert lg.code_sizes == {"uncompressed": 160000, "compressed": 34000} and lg.total_eval_ms == 470000


def test_nvidia_smi_table_gives_the_device():
    lg = Log(str(FIX / "era2_sliding_window.log"))
    assert lg.device == "NVIDIA H100 80GB HBM3" and len(lg.gpus) == 8


def test_metric_is_chosen_by_kind_not_by_position(tmp_path):
    """TTT > sliding > round trip whatever the order; a later final_* round trip or a pre-quant line never wins."""
    p = tmp_path / "x.log"
    p.write_text((FIX / "era3_legal_ttt.log").read_text() + "final_int8_zlib_roundtrip_exact val_loss:1.95000000 val_bpb:1.15500000\n"
                 "pre_quant_exact val_loss:1.90000000 val_bpb:1.12500000\n")
    lg = Log(str(p))
    assert lg.metric_name == "legal_ttt_exact" and lg.final("roundtrip") == 1.155 and lg.final("pre") == 1.125
    p.write_text("quantized_sliding_window val_loss:1.9 val_bpb:1.1\nquantized val_loss:2.0 val_bpb:1.2\n")
    assert Log(str(p)).metric_name == "quantized_sliding_window"
    p.write_text("diagnostic pre-quantization post-ema val_loss:2.0 val_bpb:1.2\n")
    assert Log(str(p)).metric is None  # a pre-quant score is not a submission metric


def test_gpu_check_reads_through_the_shared_parser():
    lines = (FIX / "era4_phased_ttt.log").read_text().splitlines()
    p = gpu_check.parse_log(lines, {"seed", "vocab_size"})
    assert p["hparams"] == {"seed": 42, "vocab_size": 8192} and p["train_done"]["train_ms"] == 599020 and len(p["steps"]) == 9
    assert p["steps"][0]["train_ms"] == 60000.0  # "1.0m"


def test_terse_log_with_only_a_budget_line():
    """era5 (terse non-record shape): `step:N/T loss: t: avg:` lines, a `key=value` hyperparameter line, no artifact size
    in bytes but `budget:TOTAL/LIMIT ... FITS` and `code:N`: the artifact is the total less the code."""
    lg = Log(str(FIX / "era5_terse_binary.log"))
    assert (lg.metric_name, lg.metric_kind, lg.val_loss, lg.val_bpb, lg.seed) == ("final_sliding", "sliding", 2.95, 1.14, 7)
    assert (lg.train_ms, lg.steps, lg.logged_total, lg.logged_code_bytes, lg.artifact_bytes) == (900200, 6000, 15261000, 61000, 15200000)
    assert lg.artifact_derived and lg.eval_seconds == 512 and lg.score("roundtrip")["val_bpb"] == 1.165 and not lg.over_lines
    assert len(lg.train) == 12 and lg.train[0] == dict(step=500, total=6000.0, time_ms=75000.0, loss=3.85, step_avg_ms=150.0, lr_mult=None)
    assert [p["step"] for p in lg.val] == [6000]


@pytest.mark.parametrize("announce, kind", [("final_eval_mode:sliding_window stride:64 batch_seqs:32", "sliding"),
                                            ("Compiling forward_logits for sliding window eval (stride=64, seq_len=1024)...", "sliding"),
                                            ("final_eval_mode:standard", "roundtrip"), (None, "roundtrip")])
def test_roundtrip_named_score_of_an_announced_sliding_evaluation(tmp_path, announce, kind):
    """Some upstream scripts print their sliding-window final evaluation under the round-trip line's name, announcing it
    on the line before: the kind follows the announcement (the score itself is the same either way)."""
    p = tmp_path / "x.log"
    p.write_text("step:100/100 val_loss:2.0000 val_bpb:1.2000 train_time:1000ms step_avg:10.00ms\n" + (announce + "\n" if announce else "")
                 + "final_int8_zlib_roundtrip val_loss:1.9300 val_bpb:1.1430 eval_time:168000ms\n"
                 "final_int8_zlib_roundtrip_exact val_loss:1.93000000 val_bpb:1.14300000\n")
    lg = Log(str(p))
    assert (lg.metric_name, lg.metric_kind, lg.val_bpb, lg.eval_seconds) == ("final_int8_zlib_roundtrip_exact", kind, 1.143, 168)


def test_settings_printed_before_the_score_are_not_part_of_its_name(tmp_path):
    """`final_sliding_window_eval stride:64 val_loss:...`: the name is final_sliding_window_eval, so the `_exact` line finds
    its rounded twin and takes its eval_time (it was "not logged" before)."""
    p = tmp_path / "x.log"
    p.write_text("final_int6_roundtrip val_loss:2.0077 val_bpb:1.1891 eval_time:1553ms\n"
                 "final_sliding_window_eval stride:64 val_loss:1.9511 val_bpb:1.1556 eval_time:75096ms\n"
                 "final_sliding_window_eval_exact stride:64 val_loss:1.95110000 val_bpb:1.15550000\n")
    lg = Log(str(p))
    assert (lg.metric_name, lg.metric_kind, lg.val_bpb) == ("final_sliding_window_eval_exact", "sliding", 1.1555)
    assert lg.eval_seconds == pytest.approx(75.096)


# ----------------------------------------------------------------------------- check_record: former false alarms
@pytest.mark.parametrize("era", ERAS)
def test_every_era_passes_check_record(tmp_path, era):
    folder = make_folder(tmp_path, era)
    r, notes = rules(folder)
    assert all_pass(r), r
    assert {"train time", "eval time", "hardware", "size", "agrees", "seeds", "code", "traced", "validation"} <= set(r)
    assert f"({FACTS[era][1]})" in r["logs"][1] and "size only" in r["code"][1]
    assert any("--previous" in n for n in notes)


def test_a_duplicate_log_counts_once(tmp_path):
    folder = make_folder(tmp_path, "era1_int8_roundtrip")
    shutil.copy(folder / "train_seed1337.log", folder / "train.log")
    r, notes = rules(folder)
    assert all_pass(r), r
    assert "3 run(s)" in r["seeds"][1] and any("byte-identical copy" in n and "counted once" in n for n in notes)


@pytest.mark.parametrize("sub", [
    dict(bytes_code=None, code_bytes=47000),  # the other spelling
    dict(val_loss=None, blurb=None, bytes_total=None, bytes_code=None, date=None),  # only what the upstream README requires
    dict(track="track_10min_16mb"), dict(track="record"),
])
def test_submission_json_as_public_records_write_it(tmp_path, sub):
    folder = make_folder(tmp_path, "era1_int8_roundtrip", sub=sub)
    assert not failed(folder)


@pytest.mark.parametrize("value, track", [("track_non_record_16mb", "non_record_16mb"), ("non-record", "non_record_16mb"),
                                          ("10min_16mb", "10min_16mb"), ("track_10min_16mb", "10min_16mb"),
                                          ("non_record_unlimited_compute", "non_record_16mb"), ("leaderboard", "10min_16mb"), ("x", None)])
def test_track_spellings(value, track):
    assert check_record.normalize_track(value) == track


def test_track_from_submission_json_outside_a_track_folder(tmp_path):
    folder = make_folder(tmp_path, "era2_sliding_window", track="elsewhere", sub=dict(track="track_non_record_16mb"),
                         seeds=SEEDS[:1])
    r, _ = rules(folder)
    assert "track non_record_16mb (submission.json)" in r["folder"][1] and all_pass(r), r


def test_script_under_another_name(tmp_path):
    folder = make_folder(tmp_path, "era3_legal_ttt")
    (folder / "train_gpt.py").rename(folder / "train_gpt_lzma.py")
    r, notes = rules(folder)
    assert all_pass(r) and "the script is train_gpt_lzma.py (not train_gpt.py)" in notes
    (folder / "train_gpt_lzma.py").unlink()  # no script at all: files fails, the size rule still runs on the logged size
    f = failed(folder)
    assert "missing train_gpt.py" in f["files"] and "size" not in f
    assert "code 17,500" in rules(folder)[0]["size"][1] and "the compressed code size its log states" in rules(folder)[0]["size"][1]


def test_terse_non_record_folder_with_its_own_json_and_script_names(tmp_path):
    """A non-record folder as one public record ships it: submission_binary.json, train_gpt_binary.py, binary_log.txt."""
    folder = make_folder(tmp_path, "era5_terse_binary", seeds=((7, 0.0),), track="track_non_record_16mb")
    (folder / "submission.json").rename(folder / "submission_binary.json")
    (folder / "train_gpt.py").rename(folder / "train_gpt_binary.py")
    (folder / "train_seed7.log").rename(folder / "binary_log.txt")
    r, notes = rules(folder)
    assert all_pass(r), r
    assert "submission_binary.json train_gpt_binary.py + 1 log(s)" in r["files"][1]
    assert "largest total 15,261,000 = code 61,000 + artifact 15,200,000" in r["size"][1]
    assert "the submission metadata is submission_binary.json (not submission.json)" in notes
    (folder / "submission_other.json").write_text("{}")  # two candidates: none is taken
    assert "missing submission.json" in failed(folder)["files"]


# ----------------------------------------------------------------------------- check_record: problems it now catches
@pytest.mark.parametrize("train_ms, ok", [(600060, True), (600087, True), (600200, False)])
def test_wallclock_overshoot_of_up_to_two_steps(tmp_path, train_ms, ok):
    """era1: 13770 steps; a check of the clock after the step lets the step in flight and one more pass the cap."""
    folder = make_folder(tmp_path, "era1_int8_roundtrip", edit=lambda s, t: t.replace("wallclock_cap train_time:600060ms",
                                                                                        f"wallclock_cap train_time:{train_ms}ms"))
    assert ("train time" not in failed(folder)) is ok


def test_shipped_script_that_did_not_run(tmp_path):
    folder = make_folder(tmp_path, "era3_legal_ttt")
    (folder / "train_gpt.py").write_bytes(script_of(17600))
    f = failed(folder)
    assert "not the file that ran" in f["code"] and "17500 (compressed)" in f["code"] and rules(folder)[0]["code"][0] == "warning"
    assert "agrees" not in f  # bytes_code 17500 is the code size the logs count (compressed)
    (folder / "train_gpt.py").write_bytes(script_of(71000))  # the uncompressed source the log also counted is accepted
    assert "code" not in failed(folder)


def test_the_logs_own_over_line(tmp_path):
    folder = make_folder(tmp_path, "era4_phased_ttt", edit=lambda s, t: t + ("total_submission_bytes:16004000 limit:16000000 OVER\n"
                                                                             if s == 42 else ""))
    assert "train_seed42.log says: total_submission_bytes:16004000 limit:16000000 OVER" in failed(folder)["size"]


def test_oversize_from_artifact_and_code(tmp_path):
    folder = make_folder(tmp_path, "era2_sliding_window", edit=lambda s, t: t.replace("int6+zstd: 15600000", "int6+zstd: 15960000")
                         if s == 2024 else t)
    assert "largest total 16,012,000" in failed(folder)["size"]


@pytest.mark.parametrize("track, ok", [("track_10min_16mb", False), ("track_non_record_16mb", True)])
def test_record_track_needs_three_seeds(tmp_path, track, ok):
    folder = make_folder(tmp_path, "era2_sliding_window", seeds=SEEDS[:2], track=track)
    f = failed(folder)
    assert ("seeds" not in f) is ok and (ok or "asks for at least 3" in f["seeds"] and rules(folder)[0]["seeds"][0] == "warning")


@pytest.mark.parametrize("device, ok", [("NVIDIA H100 80GB HBM3", True), ("NVIDIA H100 PCIe", False), ("NVIDIA H100 NVL", False),
                                        ("NVIDIA H200", False)])
def test_device_must_be_an_h100_sxm(tmp_path, device, ok):
    folder = make_folder(tmp_path, "era2_sliding_window", edit=lambda s, t: t.replace("NVIDIA H100 80GB HBM3    ", f"{device:<25}"))
    f = failed(folder)
    assert ("hardware" not in f) is ok and (ok or f"device {device} (not an H100 SXM)" in f["hardware"])


@pytest.mark.parametrize("value, rule", [(1, "agrees"), ("1.224", "fields"), (1.2245, "agrees")])
def test_scores_get_no_loose_tolerance(tmp_path, value, rule):
    """An integer is compared exactly (not within 0.5), a string is not a number; a float within its printed digits."""
    folder = make_folder(tmp_path, "era1_int8_roundtrip", seeds=SEEDS[1:2], sub=dict(val_bpb=value), track="track_non_record_16mb")
    assert rule in failed(folder)
    ok = make_folder(tmp_path / "ok", "era1_int8_roundtrip", seeds=SEEDS[1:2], sub=dict(val_bpb=1.224), track="track_non_record_16mb")
    assert not failed(ok)


def test_bytes_total_must_be_the_largest_seeds(tmp_path):
    edit = lambda s, t: t.replace("quantized+pergroup: 15870000", "quantized+pergroup: 15860000") if s != 42 else t  # noqa: E731
    folder = make_folder(tmp_path, "era4_phased_ttt", edit=edit, sub=dict(bytes_total=15860000 + 34000))
    assert "largest seed's total is 15904000" in failed(folder)["agrees"]


@pytest.mark.parametrize("worse_by, strict, ok", [(0.02, False, True), (0.004, False, True), (0.004, True, False), (0.02, True, True),
                                                  (-0.0005, False, False)])
def test_the_bar_against_the_previous_record(tmp_path, worse_by, strict, ok):
    """The practice test (improvement > 0, p < 0.25) by default, the README rule (0.005 nats, p < 0.01) with strict;
    --previous takes the previous record's folder or its logs."""
    folder = make_folder(tmp_path, "era4_phased_ttt")
    prev = make_folder(tmp_path / "prev", "era4_phased_ttt", seeds=[(s, d + worse_by) for s, d in SEEDS])
    r, notes = rules(folder, previous=[str(prev)], strict=strict)
    assert (r["beats previous"][0] == "ok") is ok and (ok or r["beats previous"][0] == "error")
    assert ("README rule" if strict else "practice test") in r["beats previous"][1] and "Welch" in r["beats previous"][1]
    assert any(("practice test" if strict else "README rule") in n for n in notes)  # the other test, as a note
    assert rules(folder, previous=[str(p) for p in sorted(prev.glob("*.log"))], strict=strict)[0]["beats previous"] == r["beats previous"]


def test_previous_record_of_another_tokenizer_is_refused(tmp_path):
    folder = make_folder(tmp_path, "era4_phased_ttt")
    prev = make_folder(tmp_path / "prev", "era1_int8_roundtrip")
    rc, out, err = tool("check_record", folder, "--previous", *sorted(prev.glob("*.log")))
    assert rc == 1 and err.startswith("error: old and new runs used different tokenizers") and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- significance
def test_significance_refuses_or_converts_across_tokenizers(tmp_path):
    new = sorted(make_folder(tmp_path, "era4_phased_ttt").glob("*.log"))
    old = sorted(make_folder(tmp_path / "o", "era2_sliding_window").glob("*.log"))
    rc, out, err = tool("significance", "--new", *new, "--old", *old)
    assert rc == 1 and "different tokenizers" in err and out == ""
    rc, out, err = tool("significance", "--new", *new, "--old", *old, "--bpb")
    ratio = 1.945 / 1.152
    assert f"bar is {0.005 / ratio:.6f} bpb" in out and "another tokenizer" in out and "(val_bpb, bits/byte)" in out
    assert rc == 0 and "SIGNIFICANT" in out  # 1.060 vs 1.152 bpb


def test_significance_warns_on_duplicates_and_counts_them_once(tmp_path):
    folder = make_folder(tmp_path, "era4_phased_ttt")
    prev = make_folder(tmp_path / "prev", "era4_phased_ttt", seeds=[(s, d + 0.02) for s, d in SEEDS])
    shutil.copy(folder / "train_seed42.log", folder / "train.log")
    rc, out, err = tool("significance", "--new", *sorted(folder.glob("*.log")), "--old", *sorted(prev.glob("*.log")))
    assert "warning: new: train_seed42.log is a byte-identical copy of train.log; counted once" in err
    assert "new: n=3 " in out and rc == 0


def test_significance_matches_scipy_on_the_raw_values(tmp_path):
    from scipy import stats
    folder = make_folder(tmp_path, "era3_legal_ttt")
    prev = make_folder(tmp_path / "prev", "era3_legal_ttt", seeds=[(7, 0.009), (8, 0.0105), (9, 0.0125)])
    new_v = [Log(str(p)).val_loss for p in sorted(folder.glob("*.log"))]
    old_v = [Log(str(p)).val_loss for p in sorted(prev.glob("*.log"))]
    ref = stats.ttest_ind(old_v, [v + 0.005 for v in new_v], equal_var=False, alternative="greater")
    rc, out, _ = tool("significance", "--new", *sorted(folder.glob("*.log")), "--old", *sorted(prev.glob("*.log")))
    assert f"t={ref.statistic:.4f}" in out and f"p={ref.pvalue:.3g}" in out and rc == (0 if ref.pvalue < 0.01 else 1)
    assert "legal_ttt_exact (ttt)" in out


# ----------------------------------------------------------------------------- plot_log
def test_plot_log_draws_every_era_and_labels_repeated_names_by_folder(tmp_path, capsys):
    logs = []
    for era in ERAS:
        d = tmp_path / era
        d.mkdir()
        shutil.copy(FIX / f"{era}.log", d / "train.log")  # the same file name four times
        logs.append(d / "train.log")
    (tmp_path / "empty.log").write_text("nothing here\n")
    out = tmp_path / "eras.png"
    assert plot_log.main([*map(str, logs), str(tmp_path / "empty.log"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = plot_log.labels([Log(str(p)) for p in logs])
    assert names == [f"{era}/train.log (seed {FACTS[era][4]})" for era in ERAS]
    assert "warning: empty.log: no step or score lines; nothing to draw" in capsys.readouterr().err


def test_plot_log_refuses_logs_with_nothing_to_draw(tmp_path):
    (tmp_path / "a.log").write_text("hello\n")
    with pytest.raises(UserError, match="no step or score lines"):
        plot_log.main([str(tmp_path / "a.log"), "-o", str(tmp_path / "a.png")])
    assert not (tmp_path / "a.png").exists()
