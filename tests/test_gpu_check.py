"""tools/gpu_check.py: the CPU dry run end to end, its log parsing and checks on a CUDA-style log, the plan that makes
late QAT switch on, and its one-line errors. The GPU itself is only ever reached on a device machine."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, once
from data.common import UserError

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
            p = run_check("--cpu-dry-run", "--out", str(out))
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


def test_failed_child_run_is_reported_with_its_last_lines(sample_data, tmp_path):
    p = run_check("--cpu-dry-run", "--presets", "record", "--env", "NUM_HEADS=3", "--out", str(tmp_path))
    assert p.returncode == 1
    assert "record run failed (exit status 1): error: MODEL_DIM=128 is not divisible by NUM_HEADS=3" in p.stdout
    assert "last lines of" in p.stdout
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] is False and s["runs"]["record"]["ok"] is False and s["checks"]["record.completed"] is False
    assert any("record run failed" in f for f in s["failures"])


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
