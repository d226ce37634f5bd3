"""tools/gpu_check.py: the CPU dry run end to end, its log parsing and checks on a CUDA-style log, the plan that makes
late QAT switch on, and its one-line errors. The GPU itself is only ever reached on a device machine."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, once
from data.common import SHARD_HEADER_INTS, UserError

SCRIPT = ROOT / "tools" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
G = importlib.util.module_from_spec(spec)
spec.loader.exec_module(G)


def run_check(*args, env=None, timeout=300):
    full = {k: v for k, v in os.environ.items() if k != "OUT"}
    full.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def is_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def dry(sample_data, tmp_path_factory):
    with once(tmp_path_factory, "gpu_check") as (out, first):
        if first:
            p = run_check("--cpu-dry-run", "--presets", "record,baseline", "--out", str(out))
            assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
            (out / "stdout.txt").write_text(p.stdout)
    return out, json.loads((out / "summary.json").read_text()), (out / "stdout.txt").read_text()


def test_dry_run_summary(dry):
    out, s, stdout = dry
    assert s["mode"] == "cpu-dry-run" and s["ok"] is True and s["partial"] is False and not s["failures"]
    assert s["data"] in ("fineweb", "corpus", "stdlib-sample")
    assert s["data_info"]["val_tokens_used"] == min(4096, s["data_info"]["val_tokens"])
    assert list(s["runs"]) == ["record", "baseline"]
    for name, r in s["runs"].items():
        assert r["ok"] and r["exit_code"] == 0 and not r["errors"], name
        t = r["train"]
        assert t["steps"] > 0 and is_finite(t["step_ms"]) and is_finite(t["tokens_per_s"]) and t["peak_mem_gib"] is None
        assert r["attention"] == "sdpa" and r["compile"] == "off"
        assert r["config"]["micro_batches"] == 2 and t["grad_accum_steps"] == 2
        assert t["curve"][-1][0] == t["steps"] and all(len(x) == 4 for x in t["curve"])
        for k in ("startup", "compile_and_warmup", "train", "export", "roundtrip_eval_incl_load_and_compile", "total"):
            assert is_finite(r["phases_s"][k]) and r["phases_s"][k] >= 0, (name, k)
        z = r["size"]
        assert z["status"] == "ok" and z["fits_16mb"] and z["limit"] == 16_000_000
        assert z["total_bytes"] == z["artifact_bytes"] + z["code_bytes"]
        assert z["code_bytes"] == (ROOT / "train_gpt.py").stat().st_size
        assert is_finite(r["pre_quant"]["val_bpb"]) and is_finite(r["roundtrip"]["val_bpb"])
        assert is_finite(r["roundtrip"]["tokens_per_s_incl_compile"]) and is_finite(r["pre_quant"]["tokens_per_s_incl_compile"])
        assert all(v in (True, None) for v in r["checks"].values()), r["checks"]
        assert (out / f"{name}.txt").exists() and (out / f"{name}.console.txt").exists()
    # the default record recipe: GPTQ calibrated inside the cap, no late QAT; the baseline has neither
    g = s["runs"]["record"]["gptq"]
    assert g["batches"] >= 1 and g["train_plus_calibration_ms"] <= g["limit_ms"] and is_finite(g["quantize_seconds"])
    assert s["checks"]["record.gptq_calibrated_inside_cap"] is True and s["runs"]["baseline"]["gptq"] is None
    assert s["runs"]["record"]["qat"]["enabled"] is False and s["runs"]["baseline"]["qat"]["enabled"] is False
    assert s["checks"]["record.qat_enabled"] is None and s["checks"]["record.qat_switched_mid_run"] is None
    assert s["checks"]["record.size_line_ok"] is True and s["checks"]["record.compiled"] is None
    # sliding eval ran and the extrapolation is there and finite
    sl = s["runs"]["record"]["sliding"]
    assert sl["stride"] == 64 and is_finite(sl["tokens_per_s"]) and sl["full_split_tokens"] == s["data_info"]["val_tokens"]
    for name in ("record", "baseline"):
        e = s["extrapolation"][name]
        for k in ("step_ms_1gpu", "step_ms_8gpu_compute_only", "steps_in_600s_8gpu_upper_bound",
                  "train_tokens_per_s_8gpu_upper_bound", "sliding_fineweb_val_s_8gpu", "sliding_full_split_s_8gpu"):
            assert is_finite(e[k]) and e[k] > 0, (name, k)
        assert e["steps_in_600s_8gpu_upper_bound"] == int(600_000 // e["step_ms_8gpu_compute_only"]) or \
            abs(e["steps_in_600s_8gpu_upper_bound"] - 600_000 / (e["step_ms_1gpu"] / 8)) <= 1
    assert any("communication" in a for a in s["extrapolation"]["assumptions"])
    assert is_finite(s["comparison"]["record_over_baseline_step_ms"])
    # artifacts were temporary; the console report ends with the verdict
    assert not list(out.glob("*.ptz"))
    assert "OK: summary" in stdout.splitlines()[-1] and (out / "gpu_check.txt").read_text().rstrip().endswith("summary.json")


# ---------------------------------------------------------------- parsing and checks of a CUDA-style run
def cuda_log(recompile_in_training=False):
    """Lines as train_gpt.py prints them on one GPU (arrival time, text), with TORCH_LOGS lines mixed in."""
    hp = [f"{k.lower()}:{0.15 if k == 'QAT_THRESHOLD' else v}" for k, v, _ in __import__("train_gpt").HPARAMS]  # GPTQ + QAT
    lines = ["python:3.12.3 torch:2.11.0+cu130 numpy:2.5.2 device:NVIDIA H200 world_size:1 cuda:13.0", "run_id:record",
             *hp, "model_params:26993755",
             "features: attention:sdpa compile:on xsa_layers:[7, 8, 9, 10] ve_layers:[9, 10] rope_dims:16 ema:0.997 "
             "qat_threshold:0.15 clips:1.0,0.98 new_field:x",
             "train_shards:1 val_tokens:290000 world_size:1 grad_accum_steps:8 micro_batch_seqs:48",
             "warmup_steps:20 done (weights and optimizer state restored)",
             "size_forecast:18300000 limit:24000000 step:1 (order-0 entropy)",
             "step:1/20000 train_loss:6.9 train_time:700ms step_avg:700.00ms lr_mult:0.5000 extra:1"]
    lines += [f"step:{s}/20000 train_loss:5.0 train_time:{700 + (s - 1) * 600}ms step_avg:600.00ms lr_mult:0.3000"
              for s in range(10, 101, 10)]
    lines += ["late_qat:enabled step:100 lr_mult:0.149"]
    if recompile_in_training:
        lines += ["V1129 torch/_dynamo/guards.py:5396] [0/1] [__recompiles] Recompiling function forward in train_gpt.py:1",
                  "V1129 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     triggered by the following guard failure(s):",
                  "V1129 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     - 0/0: ___check_obj_id(L['self'].qat)"]
    lines += [f"step:{s}/20000 train_loss:4.0 train_time:{700 + (s - 1) * 600 + (s - 100) * 60}ms step_avg:610.00ms "
              f"lr_mult:0.1" for s in range(110, 141, 10)]
    lines += ["train_done steps:140 train_time:86500ms step_avg:617.86ms peak_mem_gib:22.50",
              "gptq_calibration: batches:16 tokens:12582912 seconds:1.84 train_plus_calibration_ms:88340 limit_ms:90000",
              "pre_quant_exact val_loss:4.00000000 val_bpb:2.40000000",
              "quantized: method:gptq scale:search seconds:3.2",
              "artifact: path=/tmp/x/record.ptz bytes=18000000 export_seconds:21.5",
              "code_bytes:60000", "total_submission_bytes:18060000 limit:24000000 ok",
              "V1129 torch/_dynamo/guards.py:5396] [1/1] [__recompiles] Recompiling function <lambda> in train_gpt.py:2",
              "final_roundtrip_exact val_loss:4.01000000 val_bpb:2.41000000 tokens:289999 eval_seconds:30.00",
              "final_sliding_exact val_loss:3.90000000 val_bpb:2.35000000 stride:64 seq_len:2048 eval_seconds:2.70",
              "sliding_eval tokens:289999 tokens_per_s:107407 full_split_tokens:290000 full_split_estimate_s:2.7",
              "final_ttt_exact val_loss:3.80000000 val_bpb:2.30000000 protocol:doc eval_seconds:10.00",
              "ttt_eval tokens:289999 tokens_per_s:29000 full_split_tokens:290000 full_split_estimate_s:10.0 "
              "full_split_8gpu_estimate_s:1.2"]
    return [(float(i), line) for i, line in enumerate(lines)]


@pytest.mark.parametrize("recompile", [False, True])
def test_cuda_style_log_is_parsed_and_checked(recompile):
    lines = cuda_log(recompile)
    names = {k.lower() for k, _, _ in __import__("train_gpt").HPARAMS} | {"preset", "smoke"}
    p = G.parse_log([l for _, l in lines], names)
    child = dict(rc=0, timed_out=False, wall_s=len(lines) + 1.0, lines=lines)
    hp_defaults = {k: v for k, v, _ in __import__("train_gpt").HPARAMS}
    r = G.analyze("record", child, p, {}, False, hp_defaults, {})
    assert r["train"]["step_ms"] == 617.86 and r["train"]["peak_mem_gib"] == 22.5 and r["train"]["grad_accum_steps"] == 8
    assert r["train"]["tokens_per_s"] == round(786432 / 617.86 * 1000, 1)
    assert r["attention"] == "sdpa" and r["compile"] == "on" and r["model_params"] == 26993755
    assert r["qat"]["step"] == 100 and r["qat"]["step_ms_before"] == 600.0 and r["qat"]["step_ms_after"] == 660.0
    assert r["size"]["fits_16mb"] is False and r["size"]["status"] == "ok" and r["size"]["export_seconds"] == 21.5
    assert r["roundtrip"]["quant_gap_bpb"] == pytest.approx(0.01)
    assert r["sliding"]["tokens_per_s"] == 107407
    tl = r["torch_logs"]
    assert tl["recompiles_total"] == 1 + recompile and tl["recompiles_during_training"] == int(recompile)
    if recompile:
        assert "qat" in tl["recompile_reasons"][0]
    c = r["checks"]
    assert c["compiled"] and c["peak_memory_reported"] and c["full_size_record_config"] and c["qat_switched_mid_run"]
    assert r["gptq"] == dict(batches=16, tokens=12582912, seconds=1.84, train_plus_calibration_ms=88340, limit_ms=90000,
                             quantize_seconds=3.2) and c["gptq_calibrated_inside_cap"] is True
    assert c["no_recompile_during_training"] is (not recompile)
    e = G.extrapolate("record", r)
    assert e["step_ms_8gpu_compute_only"] == round(617.86 / 8, 2)
    assert e["steps_in_600s_8gpu_upper_bound"] == int(600_000 // (617.86 / 8))
    assert e["sliding_fineweb_val_s_8gpu"] == round(62_021_846 / (107407 * 8), 1)
    assert r["ttt"]["protocol"] == "doc" and r["ttt"]["val_bpb"] == 2.3 and r["ttt"]["eval_seconds"] == 10.0
    assert e["ttt_protocol"] == "doc" and e["ttt_fineweb_val_s_8gpu"] == round(62_021_846 / (29000 * 8), 1)
    # a smaller model is not "the record configuration at full size"
    p2 = G.parse_log([l.replace("num_layers:11", "num_layers:4") for _, l in lines], names)
    assert G.analyze("record", child, p2, {}, False, hp_defaults, {})["checks"]["full_size_record_config"] is False


def test_log_file_is_read_through_the_shared_parser(tmp_path):
    """A run's log file (code block, then the lines) and its console give the same facts; a missing, empty or damaged
    log file falls back to the console lines."""
    import hashlib
    import train_gpt as T
    from tools.logparse import run_log
    body = [l for _, l in cuda_log()]
    names = {k.lower() for k, _, _ in T.HPARAMS} | {"preset", "smoke"}
    want = G.parse_log(body, names)
    code = b"print('the script')\n"
    head = T.CODE_HEAD.format(name="train_gpt.py", n=len(code), sha=hashlib.sha256(code).hexdigest())
    log = tmp_path / "record.txt"
    log.write_bytes(head.encode() + b"\n" + code + f"\n{T.CODE_END}\n".encode() + "\n".join(body).encode() + b"\n")
    lg = run_log(str(log), ["console only"])
    assert lg.code == code and G.parse_log(lg, names) == want
    console = body[:12]
    for content in (None, b"", log.read_bytes().replace(b"the script", b"the_script")):  # missing, empty, damaged
        log.unlink(missing_ok=True)
        if content is not None:
            log.write_bytes(content)
        lg = run_log(str(log), console)
        assert lg.code is None and lg.lines == console and G.parse_log(lg, names) == G.parse_log(console, names)


def test_gpu_plan_puts_late_qat_near_the_end():
    """The GPU run's WARMDOWN_ITERS makes train_gpt.py's own LR schedule cross QAT_THRESHOLD late in the run for any
    plausible one-GPU step time (checked with train_gpt.lr_multiplier itself)."""
    import train_gpt as T
    args = type("A", (), dict(seconds=60.0, val_tokens_used=524288, size_limit=24_000_000, compile=False))()
    data = dict(path="/d", tokenizer="/t.model", vocab=1024)
    hp_defaults = {k: v for k, v, _ in T.HPARAMS}
    env, plan = G.preset_env("record", args, data, False, hp_defaults, {"QAT_THRESHOLD": "0.15"})
    assert "SMOKE" not in env and env["PRESET"] == "record" and env["MAX_WALLCLOCK_SECONDS"] == "60.0"
    assert int(env["WARMDOWN_ITERS"]) == plan["warmdown_iters"] == math.ceil(0.3 * (60_000 // 650) / 0.15)
    hp = T.parse_hparams({k: v for k, v in env.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")})
    assert hp["NUM_LAYERS"] == 11 and hp["TRAIN_BATCH_TOKENS"] == 786432 and hp["MICRO_BATCHES"] == 8
    for step_ms in (350, 500, 650, 900, 1200):
        n = int(60_000 // step_ms)
        on = next(s + 1 for s in range(1, n) if T.lr_multiplier(hp, s, s * step_ms) < hp["QAT_THRESHOLD"])
        assert 0.4 * n < on < n, (step_ms, on, n)
    base, _ = G.preset_env("baseline", args, data, False, hp_defaults, {"WARMUP_STEPS": "5"})
    assert "WARMDOWN_ITERS" not in base and base["WARMUP_STEPS"] == "5" and int(base["TRAIN_LOG_EVERY"]) >= 1


# ---------------------------------------------------------------- errors and wheels
def one_error_line(p):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr[-2000:])
    return lines[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_without_dry_run(tmp_path):
    line = one_error_line(run_check("--out", str(tmp_path)))
    assert "no CUDA device" in line and "--cpu-dry-run" in line


def test_missing_zstandard_says_how_to_carry_a_wheel(tmp_path):
    fake = tmp_path / "fake" / "zstandard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    line = one_error_line(run_check("--cpu-dry-run", "--out", str(tmp_path / "o"), env={"PYTHONPATH": str(fake.parent)}))
    assert "zstandard" in line and "pip download" in line and "--wheels .whl" in line and "PYTHONPATH=/tmp/site" in line


def test_bad_options_are_one_line(sample_data, tmp_path):
    assert "not a train_gpt.py variable" in one_error_line(run_check("--cpu-dry-run", "--env", "NOPE=1", "--out", str(tmp_path)))
    assert "--presets" in one_error_line(run_check("--cpu-dry-run", "--presets", "fast", "--out", str(tmp_path)))
    assert "--tokenizer needs --data" in one_error_line(run_check("--cpu-dry-run", "--tokenizer", "x.model", "--out", str(tmp_path)))
    assert "no *_train_*.bin" in one_error_line(run_check("--cpu-dry-run", "--data", str(tmp_path), "--out", str(tmp_path)))
    data_path, tok = sample_data
    wrong = tmp_path / "x_sp1024"
    wrong.mkdir()
    for split in ("train", "val"):
        (wrong / f"x_{split}_000000.bin").write_bytes(sorted(data_path.glob(f"*_{split}_*.bin"))[0].read_bytes())
    (wrong / "manifest.json").write_text(json.dumps({"tokenizer": {"model": "t.model", "sha256": "0" * 64}}))
    line = one_error_line(run_check("--cpu-dry-run", "--data", str(wrong), "--tokenizer", str(tok), "--out", str(tmp_path)))
    assert "is not the tokenizer" in line
    h = run_check("--help")
    assert h.returncode == 0 and "--cpu-dry-run" in h.stdout and "--wheels" in h.stdout
    for flag in ("--peer SCRIPT", "--peer-env KEY=VALUE", "--plan", "--lease SECONDS", "peer_ratio", "default record"):
        assert flag in " ".join(h.stdout.split()), flag


def test_failed_child_run_is_reported_with_its_last_lines(sample_data, tmp_path):
    p = run_check("--cpu-dry-run", "--presets", "record", "--env", "NUM_HEADS=3", "--peer", "train_gpt.py", "--out", str(tmp_path))
    assert p.returncode == 1
    assert "record run failed (exit status 1): error: MODEL_DIM=128 is not divisible by NUM_HEADS=3" in p.stdout
    assert "last lines of" in p.stdout
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] is False and s["runs"]["record"]["ok"] is False and s["checks"]["record.completed"] is False
    assert any("record run failed" in f for f in s["failures"])
    # no run of ours to compare with: the peer is not started (lease time)
    assert s["peer"]["skipped"] == "no run of ours succeeded, nothing to compare with" and not (tmp_path / "peer.console.txt").exists()
    assert "peer train_gpt.py: skipped (no run of ours succeeded" in p.stdout


def test_wheels_are_installed_for_the_children(tmp_path):
    """--wheels DIR: every wheel goes into a temporary folder that the child runs get on PYTHONPATH."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    name = "gpucheck_probe"
    with zipfile.ZipFile(wheels / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}-1.0.dist-info/RECORD", "")
    site = G.install_wheels(wheels)
    try:
        env = G.child_base_env(site, True, set())
        out = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.VALUE)"], env=env, capture_output=True,
                             text=True)
        assert out.stdout.strip() == "42", out.stderr
        assert env["CUDA_VISIBLE_DEVICES"] == "" and env["TORCH_LOGS"] == "recompiles,graph_breaks"
    finally:
        import shutil
        shutil.rmtree(site, ignore_errors=True)
    with pytest.raises(UserError, match="no \\*.whl"):
        G.install_wheels(tmp_path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="children would use the real GPU")
def test_gpu_mode_flow_with_the_cuda_probe_faked(sample_data, tmp_path, monkeypatch, capsys):
    """The non-dry path of main() (plan, env, parsing, CUDA-only checks) on this CPU: torch.cuda.is_available and the
    probe are faked in this process only, so the children run a tiny model on the CPU and the checks that need CUDA
    (compile on, peak memory, full-size config) must come out False, never crash or pass."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(G, "gpu_probe", lambda torch: dict(device="fake GPU", sdpa_flash_gqa=True))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data_path, tok = sample_data
    tiny = dict(NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=1024,
                MICRO_BATCHES=2, WARMUP_STEPS=2, ITERATIONS=12, QUANT_MIN_NUMEL=4096, BIGRAM_VOCAB_SIZE=512, BIGRAM_DIM=32,
                VE_DIM=32, EVAL_STRIDE=64, EVAL_BATCH_SEQS=16, QAT_THRESHOLD=0.15, GPTQ_CALIB_BATCHES=2)
    argv = ["--presets", "record", "--seconds", "30", "--val-tokens", "4096", "--data", str(data_path), "--tokenizer",
            str(tok), "--out", str(tmp_path)] + [a for k, v in tiny.items() for a in ("--env", f"{k}={v}")]
    assert G.main(argv) == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["mode"] == "gpu" and s["host"]["gpu"]["device"] == "fake GPU" and s["data"] == "stdlib-sample"
    r = s["runs"]["record"]
    assert r["ok"] and r["config"]["max_wallclock_seconds"] == 30.0 and "SMOKE" not in str(s["settings"])
    assert r["plan"]["warmdown_iters"] == r["config"]["warmdown_iters"] == math.ceil(0.3 * int(30_000 / 650) / 0.15)
    c = s["checks"]
    assert c["record.completed"] and c["record.qat_enabled"] and c["record.size_line_ok"]
    assert c["record.compiled"] is False and c["record.peak_memory_reported"] is False
    assert c["record.full_size_record_config"] is False and c["record.no_recompile_during_training"] is True
    assert is_finite(s["extrapolation"]["record"]["steps_in_600s_8gpu_upper_bound"])
    assert "NOT OK" in capsys.readouterr().out


# ---------------------------------------------------------------- --peer: another training script on the same card
@pytest.fixture(scope="module")
def peer_dry(sample_data, tmp_path_factory):
    """Exactly `--cpu-dry-run --peer train_gpt.py`: our record preset, then our own script as the peer (SMOKE size)."""
    with once(tmp_path_factory, "gpu_check_peer") as (out, first):
        if first:
            p = run_check("--cpu-dry-run", "--peer", "train_gpt.py", "--out", str(out))
            assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
            (out / "stdout.txt").write_text(p.stdout)
    return out, json.loads((out / "summary.json").read_text()), (out / "stdout.txt").read_text()


def test_dry_run_with_our_script_as_the_peer(peer_dry):
    out, s, stdout = peer_dry
    assert s["ok"] is True and not s["failures"] and list(s["runs"]) == ["record"]  # one preset by default
    ratio_lines = [l for l in stdout.splitlines() if l.startswith("peer_ratio ")]
    assert len(ratio_lines) == 1, ratio_lines
    import re
    m = re.fullmatch(r"peer_ratio tokens_per_s:(\S+) step_ms:(\S+) compile_s:(\S+)", ratio_lines[0])
    assert m and all(is_finite(float(x)) and float(x) > 0 for x in m.groups()), ratio_lines[0]
    pr = s["peer"]
    assert pr["ok"] and pr["exit_code"] == 0 and not pr["timed_out"] and pr["script_name"] == "train_gpt.py"
    assert pr["standin"] and pr["standin_imported"] and "SDPA through the flash_attn_interface stand-in" in pr["attention"]
    assert pr["ours"]["attention"] == "sdpa" and s["settings"]["attention_set_for_peer"] == "sdpa"
    # same shards, global batch, sequence length and wall-clock, stated by the peer's own log
    assert list(pr["env"]) == [k for k, _ in G.PEER_ENV_DOC]
    assert pr["env"]["TRAIN_BATCH_TOKENS"] == "1024" and pr["env"]["TRAIN_SEQ_LEN"] == "128"
    assert pr["env"]["MAX_WALLCLOCK_SECONDS"] == "60.0" and pr["env"]["CHECKPOINT_EVERY"] == "0"
    assert pr["same_global_batch"] is True and pr["same_seq_len"] is True
    assert pr["data"] == dict(train_shards=3, val_tokens=4096)
    a, b = pr["ours"], pr["peer"]
    for t in (a, b):
        assert t["steps"] == 16 and is_finite(t["step_ms"]) and is_finite(t["tokens_per_s"]) and is_finite(t["compile_s"])
        assert t["tokens_per_s"] == round(1024 / t["step_ms"] * 1000, 1) and t["source"] == "train_done"
        assert t["roundtrip"]["name"] == "final_roundtrip_exact" and is_finite(t["roundtrip"]["val_bpb"])
    assert a["step_ms"] == s["runs"]["record"]["train"]["step_ms"]
    for k in ("tokens_per_s", "step_ms", "compile_s"):
        assert pr["ratio"][k] == round(a[k] / b[k], 3)
    assert f"step_ms:{pr['ratio']['step_ms']}" in ratio_lines[0]
    # the same script on the same shards, batch and validation prefix trains and scores the same model
    assert abs(a["roundtrip"]["val_bpb"] - b["roundtrip"]["val_bpb"]) < 1e-6
    assert any(l.startswith("peer ours=record: step_ms:") and "roundtrip_bpb:" in l for l in stdout.splitlines())
    assert any(l.startswith("peer train_gpt.py: step_ms:") and "roundtrip_bpb:" in l for l in stdout.splitlines())
    # the plan, lease hygiene and the output folder
    assert set(s["plan"]["runs"]) == {"record", "peer"} and s["plan"]["fits_lease"]
    assert s["plan"]["runs"]["record"]["phases"]["compile_warmup"] == 105.0
    assert s["plan"]["runs"]["peer"]["phases"]["compile_warmup"] == G.PEER_COMPILE_WARMUP_S
    assert "checkpoint_every:0" in (out / "record.txt").read_text() and "checkpoint_every:0" in (out / "peer.txt").read_text()
    assert (out / "peer.console.txt").exists() and s["removed_large_files"] == []
    assert not G.large_files(out) and not list(out.glob("*.ptz")) and not list(out.glob("*.ckpt"))
    assert "plan: predicted seconds on one H200" in (out / "gpu_check.txt").read_text()


FAKE_PEER = '''
import json, os, sys, time
import torch
from flash_attn_interface import flash_attn_func
q, kv = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
assert flash_attn_func(q, kv, kv, causal=True).shape == q.shape
data = os.environ["DATA_PATH"]
json.dump(dict(env=dict(os.environ), files=sorted(os.listdir(data)), cwd=os.getcwd(),
               val_bytes=os.path.getsize(os.path.join(data, "fineweb_val_000000.bin")),
               tok=os.path.isfile(os.path.join(os.environ["DATA_DIR"], "tokenizers", "fineweb_1024_bpe.model"))),
          open(os.environ["DUMP"], "w"))
with open(os.environ["BIG"], "wb") as f:  # as a checkpoint would: a file over 16 MB in the output folder
    f.truncate(17_000_000)
if os.environ.get("CRASH"):
    raise ValueError("boom")
print("model_params:1000", flush=True)
time.sleep(0.5)
batch = int(os.environ["TRAIN_BATCH_TOKENS"])
for step in range(1, 6):  # a 2026-era record's step lines: train_time in minutes, tok/s a running average
    print(f"{step}/20000 train_loss: 5.0 train_time: 0.0m tok/s: {batch * 10}", flush=True)
print("stopping_early: wallclock_cap train_time: 500ms step: 5/20000")
print("DIAGNOSTIC post_ema val_loss:2.0 val_bpb:1.9 eval_time:1ms")
print("diagnostic quantized val_loss:2.1 val_bpb:1.5 eval_time:10ms")
'''


def test_a_public_style_peer_gets_our_data_and_kernel_and_is_parsed(sample_data, tmp_path):
    """A stand-in for a public record script: it prints the 2026 records' step lines, calls flash_attn_func (the
    stand-in) and writes a 17 MB file into the output folder, which the check removes."""
    script, out = tmp_path / "train_gpt.py", tmp_path / "out"
    script.write_text(FAKE_PEER)
    dump = tmp_path / "env.json"
    p = run_check("--cpu-dry-run", "--presets", "baseline", "--env", "ITERATIONS=2", "--val-tokens", "2048",
                  "--peer", str(script), "--peer-env", f"DUMP={dump}", "--peer-env", f"BIG={out / 'big.bin'}",
                  "--out", str(out), env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    pr = s["peer"]
    b = pr["peer"]
    assert pr["ok"] and pr["standin_imported"] and b["source"] == "train_done" and b["steps"] == 5
    assert b["step_ms"] == 100.0 and b["tokens_per_s"] == 10240.0 and 0.4 <= b["compile_s"] < 5
    assert b["roundtrip"] == dict(name="diagnostic quantized", val_bpb=1.5, val_loss=2.1)  # not the post_ema line
    assert pr["same_global_batch"] is None  # the fake does not state its batch
    assert pr["ratio"]["step_ms"] == round(pr["ours"]["step_ms"] / 100.0, 3)
    assert "peer_ratio tokens_per_s:" in p.stdout
    d = json.loads(dump.read_text())
    env = d["env"]
    assert d["files"] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin",
                          "fineweb_val_000000.bin"] and d["tok"]
    assert d["val_bytes"] == 4 * SHARD_HEADER_INTS + 2 * 2048  # header + the 2,048-token prefix our run scores
    assert env["TRAIN_BATCH_TOKENS"] == "1024" and env["TRAIN_SEQ_LEN"] == "128"  # our baseline run's, SMOKE-sized
    assert env["CHECKPOINT_EVERY"] == "0" and env["VAL_LOSS_EVERY"] == "0" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PYTHONPATH"].split(os.pathsep)[0].endswith("fa3_standin") and Path(d["cwd"]).name == "peer_run"
    cache = Path(env["TORCHINDUCTOR_CACHE_DIR"])
    assert cache.parent == Path(d["cwd"]).parent and out not in cache.parents  # one per call, beside the peer's folder
    assert not cache.parent.exists()  # the call's temporary folder is gone
    assert s["removed_large_files"] == [dict(file="big.bin", bytes=17_000_000)] and not (out / "big.bin").exists()
    assert "removed " in p.stdout and not G.large_files(out)


FIXTURES = ROOT / "tests" / "fixtures" / "logs"


@pytest.mark.parametrize("name, step_ms, source, batch, seq, roundtrip", [
    ("era1_int8_roundtrip", 600060 / 13770, "train_done", 524288, 1024, ("final_int8_zlib_roundtrip_exact", 1.224)),
    ("era2_sliding_window", 600010 / 8795, "train_done", 786432, 2048, ("final_int6_roundtrip_exact", 1.173)),
    ("era3_legal_ttt", 600090 / 6975, "train_done", 786432, 2048, ("quantized", 1.1437)),
    ("era4_phased_ttt", 599020 / 4925, "train_done", 1000, 2048, ("diagnostic quantized", 1.073)),
    ("era5_terse_binary", 150.0, "step_avg", 524288, 1024, ("final_binary_roundtrip", 1.165)),
])
def test_peer_timing_reads_every_public_log_era(name, step_ms, source, batch, seq, roundtrip):
    """run_timing on the public record eras' log shapes (tests/fixtures/logs): ms/step, tokens/s from the batch the
    log states (else the one we passed: 1000 here), and the quantized model's round-trip score."""
    lines = [(float(i), l) for i, l in enumerate((FIXTURES / f"{name}.log").read_text().splitlines())]
    t = G.run_timing(lines, 1000)
    assert t["source"] == source and t["step_ms"] == round(step_ms, 3)
    assert t["batch_tokens"] == batch and t["tokens_per_s"] == round(batch / t["step_ms"] * 1000, 1)
    assert t["logged"].get("train_seq_len") == seq
    assert (t["roundtrip"]["name"], t["roundtrip"]["val_bpb"]) == roundtrip
    assert t["metric"] is not None and t["compile_s"] is not None


def test_peer_timing_compile_seconds_and_step_time_by_line_shape():
    """compile_s = arrival of the first step line - the training time it reports - arrival of model_params; a line
    with tok/s gives both its elapsed training time and the step time (`train_time: 0.0m` is too coarse)."""
    a = [(0.0, "python:3.12 torch:2.9"), (2.0, "model_params:26993756"), (7.0, "warmup_step:20/20"),
         (12.0, "step:1/20000 train_loss:6.9318 train_time:500ms step_avg:500.00ms"),
         (16.5, "step:10/20000 train_loss:6.0739 train_time:5000ms step_avg:500.00ms")]
    t = G.run_timing(a, 786432)
    assert t["compile_s"] == 9.5 and t["step_ms"] == 500.0 and t["source"] == "step_avg" and t["roundtrip"] is None
    b = [(1.0, "model_params:35945671"), (30.0, "1/20000 train_loss: 9.0087 train_time: 0.0m tok/s: 786432"),
         (31.0, "2/20000 train_loss: 8.0 train_time: 0.0m tok/s: 393216"),
         (40.0, "DIAGNOSTIC post_ema val_loss:1.9235 val_bpb:1.1392 eval_time:1959ms")]
    t = G.run_timing(b, 786432)
    assert t["compile_s"] == 28.0 and t["step_ms"] == 2000.0 and t["source"] == "tok/s" and t["tokens_per_s"] == 393216.0
    assert t["roundtrip"] is None and t["compile_from"] == "model_params"  # a post-EMA score is not the round trip
    t = G.run_timing([(3.0, "5/100 train_loss: 4.0 train_time: 0.1m")], None)  # no model_params, no tok/s, no batch
    assert t["step_ms"] == 1200.0 and t["tokens_per_s"] is None and t["compile_s"] == 0.0 and t["compile_from"] == "process start"
    assert G.run_timing([(1.0, "Traceback (most recent call last):")], 1024)["step_ms"] is None


def test_fa3_standin_matches_attention_and_the_varlen_form(tmp_path):
    """The flash_attn_interface stand-in: FlashAttention's (batch, seq, heads, dim) layout, GQA, causal and windows
    (bottom-right aligned when there are more keys), and the varlen form equal to one call per sequence, gradients
    included; unsupported options refused."""
    import torch
    G.write_standin(tmp_path)
    spec = importlib.util.spec_from_file_location("flash_attn_interface", tmp_path / "flash_attn_interface.py")
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)

    def reference(q, k, v, causal, window=(-1, -1)):
        tq, tk, r = q.size(1), k.size(1), q.size(2) // k.size(2)
        k, v = k.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.size(-1) ** 0.5
        d = (torch.arange(tq)[:, None] + tk - tq) - torch.arange(tk)[None, :]
        ok = torch.ones_like(d, dtype=torch.bool)
        ok &= (d >= 0) if causal else (d >= -window[1]) if window[1] >= 0 else ok
        ok &= (d <= window[0]) if window[0] >= 0 else ok
        return torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~ok, float("-inf")).softmax(-1), v)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 7, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for causal in (True, False):
        for window in ((-1, -1), (2, -1), (2, 1)):
            out = fa.flash_attn_func(q, k, v, causal=causal, window_size=window)
            assert out.shape == q.shape and out.is_contiguous()
            assert torch.allclose(out, reference(q, k, v, causal, window), atol=1e-12), (causal, window)
    k9, v9 = (torch.randn(2, 9, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.allclose(fa.flash_attn_func(q, k9, v9, causal=True), reference(q, k9, v9, True), atol=1e-12)
    lens = [5, 9, 2, 3]
    cu = torch.tensor([0, 5, 14, 16, 19], dtype=torch.int32)
    qs = torch.randn(19, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ks, vs = (torch.randn(19, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (True, (2, 0))):
        out = fa.flash_attn_varlen_func(qs, ks, vs, cu, cu, max(lens), max(lens), causal=causal, window_size=window)
        want = torch.cat([fa.flash_attn_func(qs[a:b][None], ks[a:b][None], vs[a:b][None], causal=causal,
                                             window_size=window)[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
        assert torch.allclose(out, want, atol=1e-12), (causal, window)
        w = torch.randn(out.shape, generator=g, dtype=torch.float64)
        got, ref = (torch.autograd.grad((x * w).sum(), (qs, ks, vs)) for x in (out, want))
        assert all(torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-12) for a, b in zip(got, ref))
    for bad in (dict(softcap=30.0), dict(return_attn_probs=True), dict(attention_chunk=128)):
        with pytest.raises(NotImplementedError, match="stand-in"):
            fa.flash_attn_func(q, k, v, causal=True, **bad)
    fa.flash_attn_func(q, k, v, causal=True, deterministic=True, num_splits=1, qv=None)  # harmless options pass


def test_peer_that_crashes_is_reported_with_its_last_lines(tmp_path):
    """run_peer on a script that fails before training: exit status, its last line, no ratio."""
    script = tmp_path / "crash.py"
    script.write_text("print('model_params:1')\nraise ValueError('boom: the peer needs a package this image lacks')\n")
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    args = type("A", (), dict(seconds=60.0, max_total=600.0, val_tokens_used=4096))()
    hp = dict(VOCAB_SIZE=1024, TRAIN_BATCH_TOKENS=1024, MICRO_BATCHES=2, TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=0, TRAIN_LOG_EVERY=2)
    view = dict(root="/d", dataset="/d/ds", tokenizer="/t.model", train_shards=1, val_tokens=4096)
    ours = [(1.0, "model_params:5"), (3.0, "step:1/16 train_loss:6.9 train_time:500ms step_avg:500.00ms"),
            (9.0, "train_done steps:16 train_time:8000ms step_avg:500.00ms")]
    import time
    pr = G.run_peer(script, args, True, "record", hp, dict(attention="sdpa"), ours, view, None,
                    G.child_base_env(None, True, set()), {}, work, out, time.monotonic() + 60)
    assert pr["ok"] is False and pr["exit_code"] == 1 and pr["peer"]["step_ms"] is None
    assert pr["ours"]["step_ms"] == 500.0 and pr["ours"]["compile_s"] == 1.5 and pr["ratio"]["step_ms"] is None
    assert pr["failures"] == ["peer run failed (exit status 1): ValueError: boom: the peer needs a package this image lacks"]
    assert pr["attention"].startswith("FlashAttention 3") and pr["env"]["EVAL_SEQ_LEN"] == "128"
    assert (out / "peer.console.txt").exists()
    assert "peer_ratio tokens_per_s:- step_ms:- compile_s:-" in G.peer_lines(pr)


# ---------------------------------------------------------------- --plan, --lease, and the output folder
def test_plan_prints_each_phase_and_refuses_what_exceeds_the_lease(sample_data, tmp_path):
    out = tmp_path / "never"
    p = run_check("--plan", "--out", str(out))  # the GPU plan, on a machine without one: nothing runs
    assert p.returncode == 0, p.stderr
    assert "record: start 15 + compile+warm-up 105 + training 60 + calibration 10 + export 30 + evaluations" in p.stdout
    assert "total " in p.stdout and "--lease 780 s: fits" in p.stdout and not out.exists()
    p = run_check("--plan", "--presets", "frontier", "--peer", "train_gpt.py", "--seconds", "30", "--out", str(out))
    assert p.returncode == 0 and "frontier: start 15 + compile+warm-up 188 + training 30" in p.stdout
    assert "peer (train_gpt.py): start 15 + compile+warm-up 188 + training 30 + export+evaluations 120" in p.stdout
    line = one_error_line(run_check("--plan", "--presets", "record,baseline,frontier", "--peer", "train_gpt.py"))
    assert "the plan needs" in line and "but --lease is 780 s" in line and "peer 383 s" in line
    assert run_check("--plan", "--presets", "record,baseline,frontier", "--lease", "2000").returncode == 0
    # a real (dry) run is refused the same way, before anything runs
    line = one_error_line(run_check("--cpu-dry-run", "--lease", "100", "--out", str(out)))
    assert "--lease is 100 s" in line and not out.exists()
    hp = __import__("train_gpt").parse_hparams({"PRESET": "baseline"})
    ph = G.plan_run("baseline", hp, 60.0, 524288)
    assert ph["compile_warmup"] == G.COMPILE_WARMUP_S["record"] and ph["calibration"] == G.PHASE_S["calibration_rtn"]
    assert ph["evaluations"] == round(G.PHASE_S["eval_fixed"] + 2 * 524288 / G.EVAL_TOKENS_PER_S["standard"], 1)  # no sliding
    plan = G.make_plan({"baseline": ph}, G.plan_peer(60.0), 780.0, 570.0)
    assert plan["total_s"] == round(sum(ph.values()) + sum(G.plan_peer(60.0).values()), 1)


def test_peer_and_output_folder_errors_are_one_line(tmp_path):
    assert "--peer nope.py: no such file" in one_error_line(run_check("--cpu-dry-run", "--peer", "nope.py"))
    assert "not a file" in one_error_line(run_check("--cpu-dry-run", "--peer", str(tmp_path)))
    assert "--peer-env needs --peer" in one_error_line(run_check("--cpu-dry-run", "--peer-env", "TTT_ENABLED=0"))
    assert "expected KEY=VALUE" in one_error_line(run_check("--cpu-dry-run", "--peer", "train_gpt.py", "--peer-env", "X"))
    assert "CHECKPOINT_EVERY=0" in one_error_line(run_check("--cpu-dry-run", "--env", "CHECKPOINT_EVERY=100"))
    assert "--env: NUM_HEADS='four' is not a valid int" in one_error_line(run_check("--cpu-dry-run", "--env", "NUM_HEADS=four"))
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "old.ckpt", "wb") as f:
        f.truncate(G.LARGE_FILE_BYTES + 1)
    line = one_error_line(run_check("--cpu-dry-run", "--out", str(out)))
    assert "old.ckpt" in line and "over 16,000,000 bytes" in line and (out / "old.ckpt").exists()  # refused, not deleted
    (out / "sub").mkdir()
    (out / "sub" / "small.txt").write_text("x")
    (out / "sub" / "link").symlink_to(out / "old.ckpt")
    assert G.large_files(out) == [out / "old.ckpt"]
    assert G.remove_large_files(out) == [dict(file="old.ckpt", bytes=G.LARGE_FILE_BYTES + 1)]
    assert not G.large_files(out) and (out / "sub" / "small.txt").exists()


def test_docs_name_the_peer_variables_and_the_new_flags():
    """The module docstring (--help's text) and tools/README.md describe --peer, --peer-env, --plan and --lease, and
    the README's table names every variable a peer gets."""
    for flag in ("--peer SCRIPT", "--peer-env", "--plan", "--lease", "peer_ratio tokens_per_s:X step_ms:Y compile_s:Z",
                 "CHECKPOINT_EVERY=0", "TORCHINDUCTOR_CACHE_DIR", "16,000,000 bytes", "COMPILE_WARMUP_S"):
        assert flag in " ".join(G.__doc__.split()), flag
    readme = (ROOT / "tools" / "README.md").read_text()
    section = readme.split("## `gpu_check.py`", 1)[1].split("\n## ", 1)[0]
    for var, _ in G.PEER_ENV_DOC:
        assert f"`{var}`" in section, var
    for flag in ("--peer SCRIPT", "--peer-env", "--plan", "--lease", "peer_ratio", "removed_large_files"):
        assert flag in section, flag
