"""tools/: the record workflow (make_record, check_record, significance, inspect_artifact, plot_log, pack_code) on a
real SMOKE run (the shared `smoke` fixture) and one packed SMOKE run; multi-seed cases use copies of the real log
with edited seeds and scores; upstream-format folders are synthetic."""
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT, SHORT, metric, once, run_script
from tools import check_record, inspect_artifact, make_record, pack_code, plot_log, significance
from data.common import UserError
from tools.logparse import Log

TOOLS = ["make_record", "check_record", "significance", "inspect_artifact", "plot_log", "pack_code"]
TAIL = b"\n==== end of code ====\n"


def tool(name, *args, env=None):
    """Run a tool as a user would: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)
    return p.returncode, p.stdout, p.stderr


def call(main, *args):
    """A tool's main() in this process, with argv as the shell would give it."""
    return main([str(a) for a in args])


def variant(log: bytes, seed=None, shift=0.0, code=None, edit=None) -> bytes:
    """A copy of a real log as another run: new seed, final scores shifted by `shift`, another code block, or an
    arbitrary (old, new) text edit after the code block. The code block stays self-consistent."""
    head, rest = log.split(b"\n", 1)
    old_code, after = rest.split(TAIL, 1)
    text = after.decode()
    if seed is not None:
        text = re.sub(r"^seed:\d+$", f"seed:{seed}", text, flags=re.M).replace("run_id:run\n", f"run_id:run{seed}\n")
    if shift:
        text = re.sub(r"^((?:final_\w+|pre_quant)_exact val_loss:)([\d.]+)( val_bpb:)([\d.]+)",
                      lambda m: f"{m[1]}{float(m[2]) + shift:.8f}{m[3]}{float(m[4]) + shift / math.log(2) / 2:.8f}", text, flags=re.M)
    if edit:
        assert edit[0] in text, edit
        text = text.replace(*edit)
    if code is not None:
        head = f"==== code: train_gpt.py code_bytes:{len(code)} sha256:{hashlib.sha256(code).hexdigest()} ====".encode()
        old_code = code
    return head + b"\n" + old_code + TAIL + text.encode()


@pytest.fixture(scope="module")
def run(smoke, tmp_path_factory):
    """The shared SMOKE run's log and artifact, copied (tests here may alter copies, never the originals)."""
    d = tmp_path_factory.mktemp("tools_smoke")
    shutil.copy(smoke["dir"] / "run.txt", d / "seed1337.log")
    shutil.copy(smoke["artifact"], d / "run.ptz")
    raw = (d / "seed1337.log").read_bytes()
    for s, shift in ((42, 0.004), (2024, -0.002)):
        (d / f"seed{s}.log").write_bytes(variant(raw, seed=s, shift=shift))
    return dict(dir=d, log=d / "seed1337.log", logs=[d / f"seed{s}.log" for s in (1337, 42, 2024)], artifact=d / "run.ptz", raw=raw)


@pytest.fixture(scope="module")
def record(run, tmp_path_factory):
    """A three-seed record folder made by make_record from the real log and two edited copies."""
    out = tmp_path_factory.mktemp("records") / "track_non_record_16mb" / "2026-01-01_Smoke_test"
    assert call(make_record.main, *run["logs"], "--name", "Smoke test", "--author", "T. Ester", "--github-id", "tester",
                             "--track", "non_record_16mb", "--date", "2026-01-01", "--out", out) == 0
    return out


def test_every_tool_has_help():
    for name in TOOLS:
        rc, out, err = tool(name, "--help")
        assert rc == 0 and out.startswith("usage:") and len(out) > 300, (name, err)


def test_logparse_reads_the_smoke_log(run, smoke):
    lg = Log(str(run["log"]))
    assert lg.format == "this" and lg.code.startswith(b'"""') and lg.declared["code_bytes"] == len(lg.code)
    assert lg.metric_name == "final_sliding_exact" and lg.seed == 1337 and lg.run_id == "run"
    assert lg.val_bpb == metric(smoke["log"], "final_sliding_exact") and lg.val_loss == metric(smoke["log"], "final_sliding_exact", "val_loss")
    assert lg.final("final_roundtrip_exact") == metric(smoke["log"], "final_roundtrip_exact")
    assert lg.artifact_bytes == run["artifact"].stat().st_size and lg.logged_total == lg.artifact_bytes + len(lg.code)
    assert lg.steps == int(lg.hparams["iterations"]) and lg.train_ms > 0 and lg.train[-1]["step"] == lg.steps
    assert lg.hparams["smoke"] == "1" and "seed" not in lg.config and "train_seq_len" in lg.config
    assert "val_tokens (data)" in lg.config and lg.world_size == 1 and lg.eval_seconds > 0
    other = Log(str(run["logs"][1]))
    assert other.seed == 42 and other.config == lg.config and other.code_sha == lg.code_sha
    assert other.val_loss == pytest.approx(lg.val_loss + 0.004, abs=1e-8)


def test_log_with_two_runs_or_damaged_code_is_refused(run, tmp_path):
    (tmp_path / "two.log").write_bytes(run["raw"] + run["raw"])
    with pytest.raises(UserError, match="holds 2 runs"):
        Log(str(tmp_path / "two.log"))
    (tmp_path / "bad.log").write_bytes(run["raw"].replace(b"import", b"imp0rt", 1))
    with pytest.raises(UserError, match="code block is damaged"):
        Log(str(tmp_path / "bad.log"))


def test_make_record_writes_a_folder_that_passes(record, run):
    files = sorted(p.name for p in record.iterdir())
    assert files == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                     "train_seed1337.log", "train_seed2024.log", "train_seed42.log"]
    logs = [Log(str(p)) for p in run["logs"]]
    assert (record / "train_gpt.py").read_bytes() == logs[0].code
    assert (record / "train_seed42.log").read_bytes() == run["logs"][1].read_bytes()
    sub = json.loads((record / "submission.json").read_text())
    for k in ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code"):
        assert sub[k] not in (None, ""), k
    vl = [lg.val_loss for lg in logs]
    assert sub["val_loss"] == round(statistics.mean(vl), 8) and sub["val_loss_std"] == round(statistics.stdev(vl), 8)
    assert sub["val_bpb"] == round(statistics.mean(lg.val_bpb for lg in logs), 8)
    assert sub["bytes_code"] == len(logs[0].code) and sub["bytes_total"] == logs[0].artifact_bytes + len(logs[0].code)
    assert sub["seeds"] == [42, 1337, 2024] and sub["seed_results"]["42"]["val_loss"] == logs[1].val_loss
    readme = (record / "README.md").read_text()
    assert "CPU SMOKE run" in readme and readme.count("<!-- AUTHOR:") == 3 and "| 2024 |" in readme
    assert "SEED=2024 SMOKE=1 python train_gpt.py" in readme
    req = (record / "requirements.txt").read_text()
    assert f"torch=={logs[0].versions['torch'].split('+')[0]}" in req and "zstandard" in req and "sentencepiece" in req
    rc, out, err = tool("check_record", record)
    assert rc == 0, out + err
    assert out.count("PASS ") == len(out.splitlines()) - 2 and "ERROR" not in out and "WARN" not in out
    assert out.splitlines()[-1].endswith(": ACCEPTED")


def test_make_record_refuses_the_record_track_for_a_smoke_run(run, tmp_path):
    out = tmp_path / "track_10min_16mb" / "2026-01-01_Smoke"
    with pytest.raises(UserError, match="not written"):
        call(make_record.main, run["log"], "--name", "Smoke", "--author", "a", "--github-id", "a", "--out", out)
    assert not out.exists() and os.listdir(out.parent) == []  # nothing half-written left behind


@pytest.mark.parametrize("case, message", [
    ("config", "different configurations: matrix_lr: 0.025 vs 0.03"),
    ("script", "different scripts"),
    ("seed", "repeated seed"),
    ("unfinished", "no final score line"),
    ("upstream", "no '==== code:' block"),
])
def test_make_record_refuses_inconsistent_logs(run, tmp_path, case, message):
    raw, other = run["raw"], tmp_path / "other.log"
    cut = raw.index(b"\nfinal_roundtrip_exact") + 1
    other.write_bytes({"config": lambda: variant(raw, seed=7, edit=("matrix_lr:0.025\n", "matrix_lr:0.03\n")),
                       "script": lambda: variant(raw, seed=7, code=Log(str(run["log"])).code + b"# changed\n"),
                       "seed": lambda: variant(raw, shift=0.001),
                       "unfinished": lambda: raw[:cut],
                       "upstream": lambda: raw.split(TAIL, 1)[1]}[case]())
    logs = [run["log"], other] if case not in ("unfinished", "upstream") else [other]
    with pytest.raises(UserError, match=re.escape(message)):
        call(make_record.main, *logs, "--name", "x", "--author", "a", "--github-id", "a", "--out", tmp_path / "2026-01-01_x")
    assert not (tmp_path / "2026-01-01_x").exists()


def _tamper(folder, case):
    sub = json.loads((folder / "submission.json").read_text())
    if case == "val_bpb":  # one seed's score instead of the mean: traced to a log line, but not the mean
        sub["val_bpb"] = sub["seed_results"]["42"]["val_bpb"]
    elif case == "bytes_total":
        sub["bytes_total"] -= 1000
    elif case == "field":
        del sub["github_id"]
    elif case == "script":
        (folder / "train_gpt.py").write_bytes((folder / "train_gpt.py").read_bytes().replace(b"0.025", b"0.026", 1))
    elif case == "missing":
        (folder / "README.md").unlink()
    elif case == "oversize":  # the log says the artifact was 15.99 MB: code + artifact > 16,000,000
        p = folder / "train_seed42.log"
        p.write_bytes(re.sub(rb"(artifact: path=\S+ bytes=)\d+", rb"\g<1>15990000", p.read_bytes()))
    elif case == "broken":
        (folder / "train_gpt.py").write_bytes(b"def broken(:\n")
    (folder / "submission.json").write_text(json.dumps(sub))


@pytest.mark.parametrize("case, level, rule, detail", [
    ("val_bpb", "warning", "agrees", "val_bpb"), ("bytes_total", "warning", "agrees", "bytes_total"),
    ("field", "warning", "fields", "github_id"), ("script", "warning", "code", "logged different code"),
    ("missing", "error", "files", "missing README.md"), ("oversize", "error", "size", "limit 16,000,000"),
    ("broken", "error", "compiles", "SyntaxError"),
])
def test_check_record_flags_tampered_folders(record, tmp_path, case, level, rule, detail):
    folder = tmp_path / "track_non_record_16mb" / record.name
    shutil.copytree(record, folder)
    _tamper(folder, case)
    res, _ = check_record.check(str(folder))
    flagged = {r: (lv, d) for lv, r, d in res if lv != "ok"}
    assert rule in flagged and flagged[rule][0] == level and detail in flagged[rule][1], res
    if case in ("val_bpb", "oversize"):  # exit 1 on an error; a warning only with --strict
        rc, out, _ = tool("check_record", folder)
        assert rc == (1 if level == "error" else 0) and f"{'ERROR' if level == 'error' else 'WARN'} {rule}: " in out
        assert tool("check_record", folder, "--strict")[0] == 1


UPSTREAM_SEEDS = ((1337, -0.0002), (42, 0.0), (7, 0.0002))  # seed, val_bpb offset (mean offset 0)


def _upstream_folder(root, code_in_log=True, val_bpb="1.22436570"):
    """A 2026-03 era record folder (the baseline's log format), three seeds."""
    folder = root / "track_10min_16mb" / "2026-03-17_NaiveBaseline"
    folder.mkdir(parents=True)
    script = b'"""an upstream script"""\nimport os\nprint("train")\n'
    (folder / "train_gpt.py").write_bytes(script)
    (folder / "README.md").write_text("This record captures the baseline.\n")
    steps = "".join(f"step:{s}/20000 train_loss:{3 - s / 20000:.4f} train_time:{s * 43.54:.0f}ms step_avg:43.54ms\n" for s in range(200, 13800, 200))
    for seed, d in UPSTREAM_SEEDS:
        log = ((script + b"\n" + b"=" * 100 + b"\nRunning Python 3.12\n" + b"=" * 100 + b"\n") if code_in_log else b"W0318 torchrun warning\n") + (
            "model_params:17059912\nworld_size:8 grad_accum_steps:1\n"
            f"train_batch_tokens:524288 train_seq_len:1024 iterations:20000 warmup_steps:20 max_wallclock_seconds:600.000\nseed:{seed}\n"
            + steps + "step:13780/20000 val_loss:2.0606 val_bpb:1.2172 train_time:600038ms step_avg:43.54ms\n"
            "stopping_early: wallclock_cap train_time:600038ms step:13780/20000\n"
            f"Serialized model: 67224983 bytes\nCode size: {len(script)} bytes\nTotal submission size: {67224983 + len(script)} bytes\n"
            "Serialized model int8+zlib: 15815847 bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)\n"
            f"Total submission size int8+zlib: {15815847 + len(script)} bytes\n"
            f"final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:{1.2244 + d:.4f} eval_time:1401ms\n"
            f"final_int8_zlib_roundtrip_exact val_loss:{2.07269931 + d * 1.6928:.8f} val_bpb:{1.22436570 + d:.8f}\n").encode()
        (folder / f"train_seed{seed}.log").write_bytes(log)
    (folder / "submission.json").write_text(
        f'{{"author": "Baseline", "github_id": "openai", "name": "Naive Baseline", "blurb": "SP-1024 9x512 KV4.", '
        f'"date": "2026-03-18T00:05:35Z", "val_loss": 2.07269931, "val_bpb": {val_bpb}, "bytes_total": {15815847 + len(script)}, "bytes_code": {len(script)}}}')
    return folder


@pytest.mark.parametrize("code_in_log", [True, False])
def test_check_record_accepts_an_upstream_format_folder(tmp_path, code_in_log):
    folder = _upstream_folder(tmp_path, code_in_log)
    res, _ = check_record.check(str(folder))
    assert all(lv == "ok" for lv, _, _ in res), res
    details = {r: d for _, r, d in res}
    assert "train_seed42.log: final_int8_zlib_roundtrip_exact (roundtrip) val_bpb 1.22436570" in details["logs"]
    assert ("identical" if code_in_log else "size only") in details["code"]
    assert "600.04 s" in details["train time"] and "8 GPUs" in details["hardware"] and "seeds [1337, 42, 7]" in details["seeds"]
    assert {"train time", "eval time", "hardware", "size", "agrees"} <= set(details)


def test_check_record_catches_upstream_disagreement(tmp_path):
    folder = _upstream_folder(tmp_path, val_bpb="1.2169")
    (folder / "train_gpt.py").write_bytes(b"print('other')\n")
    rc, out, _ = tool("check_record", folder)
    assert rc == 1 and "WARN agrees: val_bpb 1.2169 but the logs' mean is 1.22436570" in out
    assert "ERROR traced: val_bpb 1.2169 is on no log line" in out  # no log line says 1.2169 (within 0.0001)
    assert "WARN code: train_seed1337.log logged different code" in out


# ----------------------------------------------------------------------------- significance
def t_sf_by_integration(t, df, n=20000):
    """P(T >= t) by Simpson integration of Student's t density over [0, |t|] (independent of the tool's beta function)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = abs(t) / n
    area = h / 3 * (pdf(0) + pdf(abs(t)) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n)))
    return 0.5 - area if t >= 0 else 0.5 + area


def test_welch_p_is_scipys_and_matches_tables_and_integration():
    from scipy import stats
    new, old = [2.3101, 2.3120, 2.3094], [2.3330, 2.3290, 2.3351, 2.3318]
    r = significance.welch(new, statistics.mean(old), statistics.stdev(old), 4)
    raw = stats.ttest_ind(old, [x + 0.005 for x in new], equal_var=False, alternative="greater")  # from the raw samples
    assert r["t"] == pytest.approx(raw.statistic, rel=1e-9) and r["p"] == pytest.approx(raw.pvalue, rel=1e-9)
    assert r["p"] == pytest.approx(t_sf_by_integration(r["t"], r["df"]), abs=1e-9)
    # a table value: t = 2.776445 at df = 4 has a one-sided tail of 0.025 (single old run: df = n_new - 1 = 4)
    five = [0.0, 0.001, -0.001, 0.002, -0.002]
    s = statistics.stdev(five) / math.sqrt(5)
    r1 = significance.welch([x + 1.0 for x in five], 1.0 + 0.005 + 2.776445 * s, 0.0, 1)
    assert r1["df"] == 4 and r1["t"] == pytest.approx(2.776445) and r1["p"] == pytest.approx(0.025, rel=1e-5)


def _score_logs(folder, name, losses):
    paths = []
    for i, v in enumerate(losses):
        p = folder / f"{name}{i}.log"
        p.write_text(f"seed:{i}\nfinal_sliding_exact val_loss:{v:.8f} val_bpb:{v / math.log(2) / 2.4:.8f}\n")
        paths.append(p)
    return paths


def test_significance_reproduces_a_hand_computed_example(tmp_path):
    new, old = [1.8990, 1.9030, 1.9010], [1.9120, 1.9160, 1.9100]
    # by hand: means 1.9010 and 1.912666...; d = 0.011667; s_new = 0.002, s_old = 0.0030551
    # se = sqrt(0.002^2/3 + 0.0030551^2/3) = 0.0021082; t = (0.011667 - 0.005)/se = 3.1623
    # df = se^4 / ((0.002^2/3)^2/2 + (0.0030551^2/3)^2/2) = 3.4483
    r = significance.welch(new, statistics.mean(old), statistics.stdev(old), 3)
    assert r["improvement"] == pytest.approx(0.0116667, abs=1e-6) and r["se"] == pytest.approx(0.0021082, abs=1e-6)
    assert r["t"] == pytest.approx(3.1623, abs=1e-3) and r["df"] == pytest.approx(3.4483, abs=1e-3)
    assert r["p"] == pytest.approx(t_sf_by_integration(r["t"], r["df"]), abs=1e-9)
    assert 0.01 < r["p"] < 0.03  # a real improvement, but not significant at p < 0.01
    rc, out, _ = tool("significance", "--new", *_score_logs(tmp_path, "new", new), "--old", *_score_logs(tmp_path, "old", old), "--strict")
    assert rc == 1 and "README rule (0.005 nats, p < 0.01): one-sided Welch" in out and "t=3.1623 df=3.45" in out
    assert "verdict: NOT significant by the README rule" in out
    rc2, out2, _ = tool("significance", "--new", *_score_logs(tmp_path, "n", new), "--old-mean", statistics.mean(old),
                        "--old-std", statistics.stdev(old), "--old-n", 3, "--strict")
    assert rc2 == 1 and out2.split("improvement:")[1] == out.split("improvement:")[1]
    better = [x - 0.01 for x in new]
    rc3, out3, _ = tool("significance", "--new", *_score_logs(tmp_path, "b", better), "--old", *_score_logs(tmp_path, "old", old), "--strict")
    assert rc3 == 0 and "verdict: SIGNIFICANT by the README rule" in out3
    # the default verdict is the practice test (improvement > 0, p < 0.25): the same numbers pass it, both are printed
    rc4, out4, _ = tool("significance", "--new", *_score_logs(tmp_path, "new", new), "--old", *_score_logs(tmp_path, "old", old))
    practice = significance.welch(new, statistics.mean(old), statistics.stdev(old), 3, 0.0)
    assert rc4 == 0 and f"practice test (how reviewers accepted records): one-sided Welch, improvement > 0 nats/token with p < 0.25: " \
        f"t={practice['t']:.4f}" in out4 and "-> PASS" in out4 and "t=3.1623 df=3.45" in out4 and "-> FAIL" in out4
    assert "verdict: SIGNIFICANT by the practice test" in out4


def test_significance_single_old_run_is_a_one_sample_test():
    new = [1.90, 1.902, 1.899, 1.901]
    r = significance.welch(new, 1.92, 0.0, 1)
    t = (1.92 - statistics.mean(new) - 0.005) / (statistics.stdev(new) / 2)
    assert r["t"] == pytest.approx(t) and r["df"] == pytest.approx(3)
    with pytest.raises(UserError, match="at least 2 new runs"):
        significance.welch([1.9], 1.92, 0.01, 3)


# ----------------------------------------------------------------------------- artifact, plots
def test_inspect_artifact_accounts_for_every_tensor(run, capsys):
    import train_gpt as T
    assert call(inspect_artifact.main, run["artifact"]) == 0
    out = capsys.readouterr().out
    blob = run["artifact"].read_bytes()
    meta, entries = T.unpack_artifact(blob)
    for e in entries:
        assert re.search(rf"^{re.escape(e['name'])} +{e['scheme']} ", out, re.M), e["name"]
    assert f"H0={T.entropy_bytes(entries)} file={len(blob)}" in out and "int6" in out and "mse" in out


def test_inspect_artifact_refuses_other_files_in_one_line(run):
    for path in (run["log"], ROOT / "no_such.ptz"):
        rc, out, err = tool("inspect_artifact", path)
        assert rc == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_plot_log_draws_overlaid_runs(run, tmp_path):
    out = tmp_path / "curves.png"
    assert call(plot_log.main, *run["logs"], "-o", out) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_log_without_matplotlib_says_so(run, tmp_path):
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    rc, out, err = tool("plot_log", run["log"], "-o", tmp_path / "c.png", env={"PYTHONPATH": str(tmp_path)})
    assert rc == 1 and err == "error: plot_log.py needs matplotlib: pip install -r requirements.txt\n"


# ----------------------------------------------------------------------------- packed script
@pytest.fixture(scope="module")
def packed(run, tmp_path_factory):
    """The logged script packed, and one run of the packed file with the shared short run's settings (SHORT)."""
    plain = Log(str(run["log"])).code
    with once(tmp_path_factory, "packed") as (d, first):
        if first:
            (d / "train_gpt.py").write_bytes(pack_code.pack(plain))
            rc, out, err, log = run_script(SHORT, d, script=str(d / "train_gpt.py"))
            assert rc == 0, err[-3000:]
    return dict(dir=d, plain=plain, script=d / "train_gpt.py", log=(d / "run.txt").read_text(encoding="utf-8"))


def test_packed_script_is_smaller_and_scores_identically(packed, short_run):
    code = packed["script"].read_bytes()
    assert len(code) < 0.5 * len(packed["plain"]) and pack_code.unpack(code) == packed["plain"]
    for line in ("final_roundtrip_exact", "final_sliding_exact", "pre_quant_exact"):
        for key in ("val_loss", "val_bpb"):
            assert metric(packed["log"], line, key) == metric(short_run["log"], line, key), (line, key)
    lg = Log(str(packed["dir"] / "run.txt"))  # the packed run logs and counts the packed file: what ships
    assert lg.code == code and lg.logged_code_bytes == len(code) and lg.logged_total == lg.artifact_bytes + len(code)


def test_packed_script_imports_without_running(packed):
    out = subprocess.run([sys.executable, "-c", "import sys, inspect; sys.path.insert(0, sys.argv[1]); import train_gpt as T; "
                          "print(T.__name__, callable(T.main), inspect.getsource(T.parse_hparams).split('(')[0])", str(packed["dir"])],
                         capture_output=True, text=True, cwd=packed["dir"], timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "train_gpt True def parse_hparams", out.stderr


def test_make_record_pack_ships_and_counts_the_packed_file(run, packed, tmp_path):
    out = tmp_path / "track_non_record_16mb" / "2026-01-01_Packed"
    assert call(make_record.main, run["log"], "--name", "Packed", "--author", "a", "--github-id", "a", "--track", "non_record_16mb",
                             "--out", out, "--pack") == 0
    code = (out / "train_gpt.py").read_bytes()
    sub = json.loads((out / "submission.json").read_text())
    assert pack_code.unpack(code) == packed["plain"] and sub["bytes_code"] == len(code)
    assert sub["bytes_total"] == len(code) + Log(str(run["log"])).artifact_bytes
    res, _ = check_record.check(str(out))
    assert all(lv == "ok" for lv, _, _ in res) and "packed copy" in dict((r, d) for _, r, d in res)["code"]
    # --minify: the logged source without docstrings, comments and blank lines, packed; it counts, and check_record
    # recognizes it as the logged code by its syntax tree
    out3 = tmp_path / "track_non_record_16mb" / "2026-01-01_Minified"
    assert call(make_record.main, run["log"], "--name", "Minified", "--author", "a", "--github-id", "a", "--track", "non_record_16mb",
                "--out", out3, "--minify") == 0
    small = (out3 / "train_gpt.py").read_bytes()
    sub3 = json.loads((out3 / "submission.json").read_text())
    assert pack_code.unpack(small) == pack_code.minify(packed["plain"]) and sub3["bytes_code"] == len(small) < len(code)
    assert sub3["code_sizes"] == dict(readable=len(packed["plain"]), packed=len(code), minified_packed=len(small))
    res3, _ = check_record.check(str(out3))
    assert all(lv == "ok" for lv, _, _ in res3) and "minified packed copy" in dict((r, d) for _, r, d in res3)["code"]
    # a record of the packed run itself: its log holds the packed text, shipped as is
    out2 = tmp_path / "track_non_record_16mb" / "2026-01-01_PackedRun"
    assert call(make_record.main, packed["dir"] / "run.txt", "--name", "PackedRun", "--author", "a", "--github-id", "a",
                             "--track", "non_record_16mb", "--out", out2, "--pack") == 0
    assert (out2 / "train_gpt.py").read_bytes() == packed["script"].read_bytes()


def test_pack_code_cli_round_trip(tmp_path):
    src = tmp_path / "s.py"
    src.write_bytes(b"import sys\nprint('hi', __name__, __file__.endswith('p.py'))\n" * 50)
    rc, out, _ = tool("pack_code", src, "-o", tmp_path / "p.py")
    assert rc == 0 and "smaller" in out
    run_ = subprocess.run([sys.executable, tmp_path / "p.py"], capture_output=True, text=True)
    assert run_.stdout.splitlines()[0] == "hi __main__ True"
    rc, _, _ = tool("pack_code", "--unpack", tmp_path / "p.py", "-o", tmp_path / "back.py")
    assert rc == 0 and (tmp_path / "back.py").read_bytes() == src.read_bytes()
    rc, _, err = tool("pack_code", tmp_path / "p.py", "-o", tmp_path / "pp.py")
    assert rc == 1 and err == f"error: {tmp_path / 'p.py'} is already packed\n"


def _as_record_run(raw: bytes, train_ms: int) -> bytes:
    """The smoke log edited to look like an 8xH100 record run whose training stopped at `train_ms`."""
    text = raw.split(TAIL, 1)[1].decode()
    py = re.search(r"^python:.*$", text, re.M).group()
    done = re.search(r"^train_done .*$", text, re.M).group()
    out = raw
    for old, new in ((py, re.sub(r"device:.* world_size:\d+", "device:NVIDIA H100 80GB HBM3 world_size:8", py)),
                     (done, f"train_done steps:40 train_time:{train_ms}ms step_avg:{train_ms / 40:.2f}ms"),
                     ("smoke:1\n", "smoke:0\n"), ("max_wallclock_seconds:0.0\n", "max_wallclock_seconds:600.0\n"),
                     ("val_max_tokens:32768\n", "val_max_tokens:0\n")):
        out = variant(out, edit=(old, new))
    return out


@pytest.mark.parametrize("train_ms, ok", [(600020, True), (640000, False)])
def test_record_track_time_rule(run, tmp_path, train_ms, ok):
    logs = []
    for seed, shift in ((1337, 0.0), (42, 0.001), (2024, -0.001)):  # the record track needs three seeds
        logs.append(tmp_path / f"r{seed}.log")
        logs[-1].write_bytes(variant(_as_record_run(run["raw"], train_ms), seed=seed, shift=shift))
    out = tmp_path / "track_10min_16mb" / "2026-01-01_Timed"
    if ok:  # the step in flight when the 600 s cap hit is allowed
        assert call(make_record.main, *logs, "--name", "Timed", "--author", "a", "--github-id", "a", "--out", out) == 0
        res = dict((r, (k, d)) for k, r, d in check_record.check(str(out))[0])
        assert res["train time"][0] == res["hardware"][0] == res["eval time"][0] == "ok" and "full validation split" in res["eval time"][1]
    else:
        with pytest.raises(UserError, match="not written"):
            call(make_record.main, *logs, "--name", "Timed", "--author", "a", "--github-id", "a", "--out", out)
        assert not out.exists()


def test_committed_record_folders_pass_check_record():
    folders = sorted(p for p in (ROOT / "records").glob("track_*/*") if p.is_dir())
    assert folders, "records/ should hold at least the example folder"
    for folder in folders:
        res, _ = check_record.check(str(folder))
        assert all(lv == "ok" for lv, _, _ in res), (folder.name, [r for r in res if r[0] != "ok"])


# ----------------------------------------------------------------------------- pack_code --minify
MINIFY_SRC = b'''#!/usr/bin/env python3
"""Module docstring: dropped."""
import sys  # a comment: dropped


def only_doc():
    """A body that is only a docstring becomes `pass`."""


class K:
    """Class docstring."""

    x = 1  # trailing comment

    def f(self):
        """doc"""
        s = """keep

this # not a comment
"""
        return s + "#x" + f"{self.x}"  # f-string kept


print(K().f().count("\\n"), only_doc(), K.f.__qualname__, sys.argv[1:])
'''


def test_minify_drops_docstrings_comments_and_blank_lines_only(tmp_path):
    small = pack_code.minify(MINIFY_SRC)
    assert b"docstring" not in small and b"comment: dropped" not in small and b"trailing" not in small and b"#!" not in small
    assert b'"""keep\n\nthis # not a comment\n"""' in small  # a blank line and a '#' inside a string stay
    assert b"def only_doc():\n    pass\n" in small and b'"#x"' in small
    assert pack_code.same_program(MINIFY_SRC, small) and not pack_code.same_program(MINIFY_SRC, small.replace(b"count", b"index"))
    packed = pack_code.pack(MINIFY_SRC, "s.py", minified=True)
    assert pack_code.unpack(packed) == small and len(packed) < len(pack_code.pack(MINIFY_SRC, "s.py"))
    (tmp_path / "plain.py").write_bytes(MINIFY_SRC)
    (tmp_path / "small.py").write_bytes(packed)
    outs = [subprocess.run([sys.executable, tmp_path / n, "a"], capture_output=True, text=True).stdout for n in ("plain.py", "small.py")]
    assert outs[0] == outs[1] == "3 None K.f ['a']\n"


def test_minify_keeps_docstrings_a_script_reads():
    src = b'"""usage: tool"""\nimport argparse\n\n# c\nap = argparse.ArgumentParser(description=__doc__)\n'
    assert pack_code.minify(src) == b'"""usage: tool"""\nimport argparse\nap = argparse.ArgumentParser(description=__doc__)\n'


def test_minify_refuses_when_the_syntax_tree_changes(monkeypatch):
    """The AST check is what makes --minify safe: a tree that differs from the stripped source is refused."""
    monkeypatch.setattr(pack_code, "stripped_tree", lambda src: "something else")
    with pytest.raises(UserError, match="minifying changed the program"):
        pack_code.minify(MINIFY_SRC)


def test_pack_code_reports_both_sizes_and_writes_the_minified_copy(tmp_path):
    src = tmp_path / "s.py"
    src.write_bytes(MINIFY_SRC * 1 + b"# padding comment\n" * 200)
    rc, out, _ = tool("pack_code", src, "--sizes")
    sizes = pack_code.sizes(src.read_bytes(), "s.py")
    assert rc == 0 and f"{sizes['readable']} bytes readable; packed {sizes['packed']} bytes" in out
    assert f"minified+packed {sizes['minified']} bytes" in out and sizes["minified"] < sizes["packed"] < sizes["readable"]
    rc, out, _ = tool("pack_code", src, "-o", tmp_path / "m.py", "--minify")
    assert rc == 0 and (tmp_path / "m.py").stat().st_size == sizes["minified"]
    rc, _, err = tool("pack_code", src)
    assert rc == 2 and "give -o FILE" in err
