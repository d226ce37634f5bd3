#!/usr/bin/env python3
"""GPU check: time the record recipe (or another preset) on one GPU, extrapolate to 8 GPUs, and compare with a peer.

Runs train_gpt.py as a child process once per preset (--presets, default record: one preset per call), on one GPU,
for a fixed short wall-clock, with the full global batch (MICRO_BATCHES accumulation steps), compiled, bf16 - exactly
the default record configuration except:
  MAX_WALLCLOCK_SECONDS=--seconds; when late QAT is on (QAT_THRESHOLD > 0, e.g. --env QAT_THRESHOLD=0.15; the
  default GPTQ recipe has it off), WARMDOWN_ITERS sized so it switches on for about the last 30 % of the run (so the
  compiled fake-quantization path really runs on CUDA); VAL_MAX_TOKENS=--val-tokens (a short validation prefix);
  SIZE_LIMIT_BYTES=--size-limit (a one-minute model is far from trained: at initialization the record model's
  artifact is 18.7 MB and still 16.25 MB with every int6 matrix moved to int5, so under 16,000,000 the exporter
  would stop the run before the evaluations; the summary still says whether it fits 16,000,000);
  TRAIN_LOG_EVERY so about 20 step lines arrive; TORCH_LOGS=recompiles,graph_breaks; CHECKPOINT_EVERY=0 always;
  one TORCHINDUCTOR_CACHE_DIR for every run of the call, in its temporary folder (deleted at the end).
Then it reads the logs and writes DIR/summary.json: ms/step, tokens/s, peak memory, attention backend, compile,
when late QAT switched on (and whether the switch made Dynamo recompile), step time before/after it, GPTQ's
calibration (batches, seconds, inside the cap or not) and quantization seconds, the size lines,
pre-quant / round-trip / sliding (and, with --env TTT=chunk|doc, TTT) results with each phase's seconds and
tokens/s, and an extrapolation to 8 GPUs in 600 s. DIR also gets each run's log (PRESET.txt), its console output
(PRESET.console.txt) and this script's output (gpu_check.txt); artifacts go to a temporary folder and are deleted.
Nothing over 16,000,000 bytes stays in DIR: a DIR that already holds such a file is refused, and one a run leaves
there (a checkpoint written when a run is stopped) is deleted and listed under "removed_large_files".

--peer SCRIPT: after our runs, runs SCRIPT (e.g. a public record's train_gpt.py) as a child on the same card, the same
shards (a temporary folder laid out as public scripts expect: our training shards linked as fineweb_train_*.bin, the
validation prefix we score as fineweb_val_000000.bin, the tokenizer as tokenizers/fineweb_<V>_bpe.model), and our
first preset's global batch, sequence length and wall-clock, through the variables PEER_ENV_DOC lists (DATA_PATH,
DATASETS_DIR, DATA_DIR, TOKENIZER_PATH, TRAIN_BATCH_TOKENS, TRAIN_SEQ_LEN, MAX_WALLCLOCK_SECONDS, ...; --peer-env
KEY=VALUE adds more), in its own temporary working folder. Same attention kernel: where FlashAttention 3
(flash_attn_interface) is not importable (and always in a dry run), a stand-in flash_attn_interface on torch SDPA goes
on the peer's PYTHONPATH only, and our runs get ATTN=sdpa; the summary says so. From both consoles (any log shape
tools/logparse.py reads) it takes ms/step, tokens/s, compile + warm-up seconds (model built to the first training
step) and the round-trip score if the run got there, prints both and one line
`peer_ratio tokens_per_s:X step_ms:Y compile_s:Z` (ours / peer), and writes them under "peer" in summary.json (the
peer's console is DIR/peer.console.txt, its log DIR/peer.txt). The peer is skipped when no run of ours succeeded, and
stopped at --max-total.

Plan: before running it prints the predicted wall time of each phase (start, compile + warm-up per preset, training,
calibration, export, evaluations; the peer) on one H200 and the total, from the constants COMPILE_WARMUP_S (measured:
105 s for the record preset, 188 s for frontier), PHASE_S and EVAL_TOKENS_PER_S, and refuses (exit 2) when the total
exceeds --lease (default: a 15-minute device lease less a 120 s margin). --plan prints the plan and stops.

Data (the summary's "data" says which): --data DIR (+ --tokenizer MODEL, else the manifest's or DIR's *.model) for
shards built by data/prepare_text.py or the FineWeb download; else data/datasets/fineweb10B_sp1024 if present; else
the embedded stdlib sample (data/build_sample.py builds it offline from Python's own docstrings: real text, so no
synthetic tokens are ever used). Values: "fineweb" | "corpus" | "stdlib-sample".

Needs only the GPU machine's image (torch, numpy, sentencepiece, tqdm) plus zstandard and brotli, which some images
lack: carry their wheels and pass --wheels DIR (installed into a temporary folder that goes on the children's PYTHONPATH).
--cpu-dry-run runs the same logic on the CPU at SMOKE size in well under a minute (the test suite does this, also with
--peer train_gpt.py: our own script as the peer).

  python3 tools/gpu_check.py --plan --peer records/track_10min_16mb/<folder>/train_gpt.py --seconds 45
  python3 tools/gpu_check.py --wheels .whl --data data/datasets/corpus_sp1024 --tokenizer data/tokenizers/fineweb_1024_bpe.model
  python3 tools/gpu_check.py --cpu-dry-run --peer train_gpt.py --out /tmp/gpu_check
Exit status: 0 all checks passed, 1 a run (ours or the peer) or a check failed, 2 setup error or a plan over --lease
(one line on stderr).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.common import (LIMIT_BYTES, LIMIT_SECONDS, UserError, cli, load_data_shard, read_shard_header,  # noqa: E402
                         write_atomic, write_shard)
from tools.logparse import Log, num, run_log, tokens, value  # noqa: E402  (the one log parser of the tools)

FINEWEB_VAL_TOKENS = 62_021_846  # tokens in the published FineWeb validation split
COMPETITION_LIMIT = LIMIT_BYTES
TRAIN_BUDGET_S = EVAL_BUDGET_S = LIMIT_SECONDS
N_GPUS = 8
# Published 8xH100 figures of the record and the baseline, for comparison only.
ANCHORS = {"record": dict(step_ms_8xh100=84.6, steps_600s=7096, sliding_eval_s_8xh100=73.0, peak_mem_gib=20.9),
           "baseline": dict(step_ms_8xh100=43.5)}
# One H100-class GPU doing the whole global batch: about 8x the public 8-GPU step time. Used only to size the
# warmdown (so late QAT lands in the last ~30 % of the run) and the log interval; the run measures the real value.
EXPECTED_STEP_MS = {"record": 650.0, "baseline": 350.0}
QAT_FRACTION = 0.3
DRY_ITERATIONS = 16
# --cpu-dry-run: SMOKE=1 plus these, so both presets finish in seconds on 2 CPU cores
DRY_ENV = dict(SMOKE="1", TRAIN_BATCH_TOKENS="1024", MICRO_BATCHES="2", ITERATIONS=str(DRY_ITERATIONS),
               WARMUP_STEPS="2", TRAIN_LOG_EVERY="2", EVAL_STRIDE="64", EVAL_BATCH_SEQS="16")
GPU_DEFAULTS = dict(seconds=60.0, val_tokens=524_288, size_limit=24_000_000, max_total=570.0)
DRY_DEFAULTS = dict(seconds=60.0, val_tokens=4096, size_limit=COMPETITION_LIMIT, max_total=600.0)
# variables a stray export in the calling shell must not leak into the children
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")
OUT_FILES = ("summary.json", "gpu_check.txt")
TORCH_LOG_TAGS = ("[__recompiles", "[__graph_breaks")
RECOMPILE, GRAPH_BREAK = "Recompiling function", "Graph break in user code"
LARGE_FILE_BYTES = COMPETITION_LIMIT  # nothing larger stays in --out (a checkpoint written on SIGTERM would)

# ----------------------------------------------------------------------------- the plan (--plan, --lease)
# Predicted wall time of each phase on one H200, in seconds: the one place these numbers live (--plan prints them, the
# --lease check adds them up, and the run loop uses them to decide whether a run still fits --max-total).
# Measured on one H200 (torch.compile from an empty inductor cache + WARMUP_STEPS=20, full-size model, 8 micro-batches):
COMPILE_WARMUP_S = {"record": 105.0, "frontier": 188.0}
# Assumed, not measured: the baseline (a smaller model) compiles no slower than the record; a --peer script (a public
# record of the frontier's era or later) as slowly as the frontier preset, the slower of the two measured.
COMPILE_WARMUP_S["baseline"] = COMPILE_WARMUP_S["record"]
PEER_COMPILE_WARMUP_S = COMPILE_WARMUP_S["frontier"]
# Estimates, rounded up (refine them from a summary.json's phases_s):
PHASE_S = dict(
    start=15.0,  # process start to model_params: Python, torch and CUDA initialization, shards, tokenizer
    calibration=10.0,  # after training: GPTQ (its Hessians are collected inside the training cap) and quantization
    calibration_rtn=2.0,  # after training, QUANT_METHOD=rtn (the baseline): round-to-nearest quantization only
    export=30.0,  # budget fit, compression, writing and reading back the artifact
    eval_fixed=45.0,  # evaluations: model load and compiling the evaluation graphs, before any token is scored
    peer_after_training=120.0,  # a peer's export and evaluations (the peer is stopped at --max-total regardless)
)
# tokens per second of one H100-class GPU: sliding = the public record's 62,021,846-token sliding eval (stride 64) in
# 73 s on 8 H100s (106k per GPU); standard (pre-quant and round trip) and TTT are guesses
EVAL_TOKENS_PER_S = dict(standard=1_000_000.0, sliding=100_000.0, ttt=25_000.0)
LEASE_S, LEASE_MARGIN_S = 15 * 60.0, 120.0  # a device lease, and what the machine's start and the transfers take of it
DRY_PEER_NEED_S = 10.0  # dry run: the least time left on --max-total to start the peer

# ----------------------------------------------------------------------------- the peer (--peer SCRIPT)
PEER = "peer"  # its RUN_ID and the name of its files in --out (peer.console.txt, peer.txt)
# What a --peer script gets, and why: public record scripts read their data by DATA_PATH (or DATA_DIR, DATASETS_DIR)
# and TOKENIZER_PATH and the rest by the same names as train_gpt.py. "ours" = our first preset's resolved setting.
PEER_ENV_DOC = (
    ("DATA_PATH", "the peer's data folder: our training shards linked as fineweb_train_*.bin, the validation split cut "
                  "to the prefix we score (--val-tokens) as fineweb_val_000000.bin"),
    ("DATASETS_DIR", "the same folder"),
    ("DATA_DIR", "its root, laid out as datasets/fineweb10B_sp<V>/ and tokenizers/fineweb_<V>_bpe.model"),
    ("TOKENIZER_PATH", "our tokenizer"),
    ("VOCAB_SIZE", "ours"),
    ("TRAIN_BATCH_TOKENS", "ours: the same global batch"),
    ("MICRO_BATCHES", "ours (this project's name; public records use 8 micro-batches on one GPU)"),
    ("TRAIN_SEQ_LEN", "ours: the same sequence length"),
    ("EVAL_SEQ_LEN", "ours"),
    ("MAX_WALLCLOCK_SECONDS", "ours: the same wall-clock (--seconds)"),
    ("VAL_MAX_TOKENS", "ours (scripts that read it; others see the cut validation shard)"),
    ("TRAIN_LOG_EVERY", "ours"),
    ("VAL_LOSS_EVERY", "0: no validation pass before or during training"),
    ("CHECKPOINT_EVERY", "0"),
    ("RUN_ID", PEER),
    ("LOG_DIR", "the peer's temporary working folder (also its cwd: logs/, final_model.* land there)"),
    ("ARTIFACT_DIR", "the same folder"),
)
STANDIN_MARKER = "flash_attn_interface: SDPA stand-in from tools/gpu_check.py"
# Written as flash_attn_interface.py into a temporary folder that goes first on the PEER's PYTHONPATH (never ours)
# when FlashAttention 3 is not importable (or in a dry run): the peer then runs torch SDPA, like our ATTN=sdpa run.
FA3_STANDIN = '''"""flash_attn_interface stand-in written by tools/gpu_check.py for a --peer script when FlashAttention 3 is not
installed: flash_attn_func and flash_attn_varlen_func on torch's scaled_dot_product_attention (SDPA). FlashAttention's
layouts: (batch, seq, heads, dim), or (tokens, heads, dim) with cu_seqlens; grouped-query attention when k and v have
fewer heads (query head h reads key head h // (heads / kv_heads)); the output tensor is returned alone."""
import sys

import torch
import torch.nn.functional as F

print("@MARKER@ (FlashAttention 3 is not installed)", file=sys.stderr, flush=True)
_HARMLESS = ("deterministic", "num_splits", "pack_gqa", "sm_margin", "scheduler_metadata")


def _check(kwargs, softcap, return_attn_probs):
    bad = [k for k, v in kwargs.items() if k not in _HARMLESS and not (v is None or v is False or
                                                                       (isinstance(v, (int, float)) and v == 0))]
    if softcap:
        bad.append("softcap")
    if return_attn_probs:
        bad.append("return_attn_probs")
    if bad:
        raise NotImplementedError(f"flash_attn_interface stand-in (SDPA): {', '.join(bad)} not supported")


def _allowed(q_pos, k_pos, causal, window):
    """Which keys each query may read: d = query position - key position; causal d >= 0; window (left, right) with
    -1 = unbounded: -right <= d <= left."""
    left, right = window
    d = q_pos[..., :, None] - k_pos[..., None, :]
    ok = torch.ones_like(d, dtype=torch.bool)
    if causal:
        ok &= d >= 0
    elif right >= 0:
        ok &= d >= -right
    if left >= 0:
        ok &= d <= left
    return ok


def _sdpa(q, k, v, mask, causal, scale):
    """q, k, v as (batch, heads, seq, dim); mask None (causal or not) or bool, broadcast to (batch, heads, q, k)."""
    if q.size(1) % k.size(1):
        raise ValueError(f"flash_attn_interface stand-in: {q.size(1)} query heads, {k.size(1)} key heads")
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.size(1) != k.size(1))
    if q.size(1) != k.size(1):  # with a mask: the key/value heads repeated, so the memory-efficient kernel can run
        r = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    return_attn_probs=False, **kwargs):
    _check(kwargs, softcap, return_attn_probs)
    window = (-1, -1) if window_size is None else tuple(int(x) for x in window_size)
    tq, tk = q.size(1), k.size(1)
    mask = None
    if window[0] >= 0 or (not causal and window[1] >= 0) or (causal and tq != tk):
        q_pos = torch.arange(tq, device=q.device) + (tk - tq)  # FlashAttention aligns the last query with the last key
        mask = _allowed(q_pos, torch.arange(tk, device=q.device), causal, window)
    out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal and mask is None, softmax_scale)
    return out.transpose(1, 2).contiguous()


def _around(x, shifts, fill):
    """(tiles, s, ...) -> (tiles, len(shifts) * s, ...): each tile's rows of the tile before (1), itself (0), after (-1)."""
    edge = torch.full_like(x[:1], fill)
    parts = [x if s == 0 else torch.cat([edge, x[:-1]]) if s == 1 else torch.cat([x[1:], edge]) for s in shifts]
    return torch.cat(parts, dim=1)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, window_size=(-1, -1), softcap=0.0, return_attn_probs=False, **kwargs):
    """Sequences packed back to back, (tokens, heads, dim), cu_seqlens their boundaries (the same for q and k). In
    tiles of max_seqlen tokens: a query's keys lie in its own tile and the one before (and after, when not causal),
    so each tile attends over 2 (3) tiles under a mask of sequence ids; padding reads only padding."""
    _check(kwargs, softcap, return_attn_probs)
    if cu_seqlens_k is not cu_seqlens_q and q.size(0) != k.size(0):
        raise NotImplementedError("flash_attn_interface stand-in (SDPA): different query and key sequences")
    window = (-1, -1) if window_size is None else tuple(int(x) for x in window_size)
    t, h, d = q.shape
    s = max(1, int(max(max_seqlen_q, max_seqlen_k)))
    n = -(-t // s)
    pos = torch.arange(n * s, device=q.device)
    seq = torch.searchsorted(cu_seqlens_q.to(device=q.device, dtype=torch.int64), pos, right=True) - 1
    seq = torch.where(pos < t, seq, -1).view(n, s)
    pad = (0, 0, 0, 0, 0, n * s - t)
    shifts = (1, 0) if causal else (1, 0, -1)
    qt = F.pad(q, pad).view(n, s, h, d)
    kt, vt = (_around(F.pad(x, pad).view(n, s, x.size(1), x.size(2)), shifts, 0) for x in (k, v))
    mask = (seq[:, :, None] == _around(seq, shifts, -2)[:, None, :]) & _allowed(pos.view(n, s), _around(pos.view(n, s), shifts, 0), causal, window)
    out = _sdpa(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), mask[:, None], False, softmax_scale)
    return out.transpose(1, 2).reshape(n * s, h, v.size(2))[:t]
'''.replace("@MARKER@", STANDIN_MARKER)


# ----------------------------------------------------------------------------- output
class Tee:
    def __init__(self):
        self.file = None

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()


say = Tee()


# ----------------------------------------------------------------------------- log parsing
def parse_log(log: Log | list[str], hparam_names: set[str]) -> dict:
    """The facts of one train_gpt.py run from its Log (or its log lines: the part after the code block, or the
    console), read by tools/logparse.py, the parser every tool shares. Tolerant of added fields and of lines it does
    not know."""
    lg = log if isinstance(log, Log) else Log.from_lines(log)

    def last(head, *keys):
        """The numbers of the last line starting with `head` (None when there is none)."""
        t = lg.last.get(head)
        return None if t is None else {k: (value(t[k]) if k in t else None) for k in keys}

    p: dict = dict(hparams={}, steps=[], errors=[f"error: {e}" for e in lg.errors], recompiles=0, graph_breaks=0)
    if lg.versions:
        v = lg.versions
        p["versions"] = dict(python=value(v.get("python", "")), torch=v.get("torch"), cuda=v.get("cuda"), device=lg.device,
                             world_size=lg.world_size)
    p["steps"] = [dict(step=x["step"], train_ms=x["time_ms"], loss=x["loss"], lr_mult=x["lr_mult"], step_avg_ms=x["step_avg_ms"])
                  for x in lg.train]
    if "late_qat" in lg.last:
        p["late_qat"] = last("late_qat", "step", "lr_mult")
    if "gptq_calibration" in lg.last:
        p["gptq"] = dict(last("gptq_calibration", "batches", "tokens", "seconds", "train_plus_calibration_ms", "limit_ms"),
                         quantize_seconds=(last("quantized", "seconds") or {}).get("seconds"))
    if "warmup_steps" in lg.last and any(" done" in l for l in lg.lines_with("warmup_steps:")):
        p["warmup_done"] = value(lg.last["warmup_steps"]["warmup_steps"])
    if "features" in lg.last:
        p["features"] = {k: value(v) for k, v in lg.last["features"].items() if k in ("attention", "compile", "ema", "qat_threshold")}
    if "model_params" in lg.info:
        p["model_params"] = value(lg.info["model_params"])
    if "size_forecast" in lg.last:
        p["size_forecast"] = dict(bytes=value(lg.last["size_forecast"]["size_forecast"]), step=last("size_forecast", "step")["step"])
    if lg.train_done:
        p["train_done"] = dict(steps=lg.steps, train_ms=lg.train_ms, step_avg_ms=lg.step_avg_ms,
                               peak_mem_gib=value(lg.train_done["peak_mem_gib"]) if "peak_mem_gib" in lg.train_done else None)
    for key, name, extra in (("pre_quant", "pre_quant_exact", ()), ("roundtrip", "final_roundtrip_exact", ("tokens", "eval_seconds")),
                             ("sliding", "final_sliding_exact", ("stride", "seq_len", "eval_seconds")),
                             ("ttt", "final_ttt_exact", ("protocol", "eval_seconds"))):
        if name in lg.finals:
            p[key] = dict(val_loss=lg.final(name, "val_loss"), val_bpb=lg.final(name), **last(name, *extra))
    budget = lg.lines_with("budget_fit:")
    if budget:
        p["budget_fit"] = budget[-1]
    if "artifact" in lg.last:
        p["artifact"] = dict(bytes=lg.artifact_bytes, export_seconds=last("artifact", "export_seconds")["export_seconds"])
    if "plain" in lg.code_sizes:
        p["code_bytes"] = lg.code_sizes["plain"]
    if "total_submission_bytes" in lg.last:
        t = lg.last["total_submission_bytes"]
        status = lg.lines_with("total_submission_bytes:")[-1].split()[-1]
        p["total"] = dict(bytes=lg.logged_total, limit=value(t["limit"]) if "limit" in t else None, status=status)
    if "sliding_eval" in lg.last:
        p["sliding_eval"] = last("sliding_eval", "tokens", "tokens_per_s", "full_split_tokens", "full_split_estimate_s")
    if "ttt_eval" in lg.last:
        p["ttt_eval"] = last("ttt_eval", "tokens", "tokens_per_s", "full_split_tokens", "full_split_estimate_s")
    p["recompiles"] = sum(RECOMPILE in l for l in lg.lines)
    p["graph_breaks"] = sum(GRAPH_BREAK in l for l in lg.lines)
    p["hparams"] = {k: value(v) for k, v in lg.hparams.items() if k in hparam_names}
    return p


# ----------------------------------------------------------------------------- environment
def install_wheels(wheel_dir: str | Path) -> Path:
    """Install every *.whl of wheel_dir into a fresh temporary folder (pip --no-index; plain unzip where pip is
    missing) and return that folder, for sys.path and the children's PYTHONPATH."""
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    if not wheels:
        raise UserError(f"--wheels {wheel_dir}: no *.whl files there")
    target = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--upgrade", "--target", str(target), *map(str, wheels)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"--wheels {wheel_dir}: pip could not install {', '.join(w.name for w in wheels)}: {last}")
    else:
        import zipfile
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(target)
    return target


def missing_codec_message(name: str = "zstandard") -> str:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (f"{name} is not importable by {sys.executable} (Python {py}); train_gpt.py needs it to write the artifact. "
            f"On a machine with network, in the repo root: python3 -m pip download --no-deps --only-binary=:all: "
            f"--python-version {py} --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
            f"-d .whl zstandard brotli ; carry .whl and rerun with --wheels .whl (or: python3 -m pip install --no-index "
            f"--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site)")


def check_packages() -> None:
    for name in ("zstandard", "brotli", "numpy", "sentencepiece", "tqdm", "torch"):
        try:
            __import__(name)
        except ImportError:
            if name in ("zstandard", "brotli"):
                raise UserError(missing_codec_message(name)) from None
            raise UserError(f"the Python package {name} is not importable by {sys.executable}; train_gpt.py needs it") from None


def child_base_env(site: Path | None, dry: bool, hparam_names: set[str]) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in DIST_VARS and k.lower() not in hparam_names and k not in ("PRESET", "SMOKE", "TORCH_LOGS")}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["TORCH_LOGS"] = "recompiles,graph_breaks"
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU even on a GPU machine
        env["OMP_NUM_THREADS"] = "1"  # tiny ops: two threads on a busy 2-core machine ran 70x slower (spin-waits)
    return env


def gpu_probe(torch) -> dict:
    """CUDA-only: the card, whether FlashAttention 3 is importable, and whether PyTorch SDPA's flash kernel accepts the
    record's attention call (bf16, causal, 8 query / 4 KV heads of 64, enable_gqa); if it does not, SDPA falls back
    to a slower kernel and the step time shows it."""
    props = torch.cuda.get_device_properties(0)
    info = dict(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                fa3_importable=importlib.util.find_spec("flash_attn_interface") is not None)
    import warnings
    with warnings.catch_warnings(record=True) as caught:  # SDPA explains a refused kernel in warnings
        warnings.simplefilter("always")
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            q = torch.randn(2, 8, 2048, 64, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(2, 4, 2048, 64, device="cuda", dtype=torch.bfloat16)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
            torch.cuda.synchronize()
            info["sdpa_flash_gqa"] = True
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"; the message says why
            why = [(str(e).strip().splitlines() or [type(e).__name__])[0]] + [str(w.message).splitlines()[0] for w in caught]
            info["sdpa_flash_gqa"] = False
            info["sdpa_flash_gqa_error"] = " | ".join(why)[:600]
        finally:
            q = kv = None
            torch.cuda.empty_cache()
    return info


# ----------------------------------------------------------------------------- data
def shards(d: Path, split: str) -> list[Path]:
    return sorted(d.glob(f"*_{split}_*.bin"))


def manifest_tokenizer_sha(d: Path) -> str | None:
    try:
        return json.loads((d / "manifest.json").read_text(encoding="utf-8"))["tokenizer"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_tokenizer(d: Path) -> Path | None:
    try:
        rel = json.loads((d / "manifest.json").read_text(encoding="utf-8"))["tokenizer"]["model"]
        if (d / rel).is_file():
            return (d / rel).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        pass
    models = sorted(d.glob("*.model"))
    return models[0] if len(models) == 1 else None


def resolve_data(args) -> dict:
    import sentencepiece as spm
    if args.tokenizer and not args.data:
        raise UserError("--tokenizer needs --data (the shards it tokenized)")
    if args.data:
        d = Path(args.data)
        if not shards(d, "train") or not shards(d, "val"):
            raise UserError(f"--data {d}: no *_train_*.bin and *_val_*.bin shards there")
        prefix = shards(d, "train")[0].name.split("_train_")[0]
        label = "fineweb" if prefix.startswith("fineweb") else "stdlib-sample" if prefix == "stdlib" else "corpus"
        tok = Path(args.tokenizer) if args.tokenizer else find_tokenizer(d)
        if tok is None and label == "fineweb":
            tok = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
        if tok is None or not tok.is_file():
            raise UserError(f"--data {d}: tokenizer {'not found' if tok is None else str(tok) + ' does not exist'}; "
                             "pass --tokenizer MODEL (the SentencePiece model the shards were built with)")
    else:
        fw, fw_tok = ROOT / "data" / "datasets" / "fineweb10B_sp1024", ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
        if shards(fw, "train") and shards(fw, "val") and fw_tok.is_file():
            d, tok, label = fw, fw_tok, "fineweb"
        else:
            from data.build_sample import ensure_sample
            say("data: no --data and no FineWeb shards in data/; building/reusing the embedded stdlib sample")
            d, tok = ensure_sample(ROOT)
            label = "stdlib-sample"
    want = manifest_tokenizer_sha(Path(d))
    if want and hashlib.sha256(Path(tok).read_bytes()).hexdigest() != want:
        raise UserError(f"{tok} is not the tokenizer {d} was built with (its manifest.json names sha256 {want[:12]}...); "
                         "pass the matching --tokenizer")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(tok))
    except (OSError, RuntimeError):
        raise UserError(f"{tok} is not a SentencePiece model") from None
    vocab = sp.vocab_size()
    n_train = sum(read_shard_header(f) for f in shards(d, "train"))
    n_val = sum(read_shard_header(f) for f in shards(d, "val"))
    top = max(int(load_data_shard(f).max(initial=0)) for f in (shards(d, "val")[0], shards(d, "train")[0]))
    if top >= vocab:
        raise UserError(f"{d}: token id {top} does not exist in {tok} (vocab {vocab}); the shards were built with "
                         "another tokenizer: pass the matching --tokenizer")
    return dict(label=label, path=str(Path(d).resolve()), tokenizer=str(Path(tok).resolve()), vocab=vocab,
                train_tokens=n_train, val_tokens=n_val)


# ----------------------------------------------------------------------------- one run
def preset_env(preset: str, args, data: dict, dry: bool, hp_defaults: dict, overrides: dict) -> tuple[dict, dict]:
    """The variables that turn train_gpt.py's preset into this check's run, and the planning numbers behind them."""
    thr = float(overrides.get("QAT_THRESHOLD", hp_defaults["QAT_THRESHOLD"]))
    if dry:
        expected_steps = int(overrides.get("ITERATIONS", DRY_ITERATIONS))
    else:
        expected_steps = max(1, int(args.seconds * 1000 / EXPECTED_STEP_MS.get(preset, 650.0)))
    env = dict(PRESET=preset, DATA_PATH=data["path"], TOKENIZER_PATH=data["tokenizer"], VOCAB_SIZE=str(data["vocab"]),
               MAX_WALLCLOCK_SECONDS=str(args.seconds), VAL_MAX_TOKENS=str(args.val_tokens_used),
               SIZE_LIMIT_BYTES=str(args.size_limit))
    if dry:
        env.update(DRY_ENV)
        if args.compile:
            env["COMPILE"] = "1"
    else:
        env["TRAIN_LOG_EVERY"] = str(max(1, expected_steps // 20))
    plan = dict(expected_steps=expected_steps, qat_threshold=thr)
    if preset == "record" and thr > 0:
        # With the wall-clock cap the LR multiplier is remaining_time / (WARMDOWN_ITERS * mean step time), so it drops
        # below thr for about the last thr * WARMDOWN_ITERS steps, whatever the real step time: aim that at
        # QAT_FRACTION of the expected steps (the warmdown then covers the whole run, starting near
        # thr / QAT_FRACTION = 0.5). If the card is slower, QAT covers more of the run; faster, fewer steps.
        wd = max(4, math.ceil(QAT_FRACTION * expected_steps / thr))
        env["WARMDOWN_ITERS"] = str(wd)
        plan["warmdown_iters"] = wd
    env.update(overrides)
    env["CHECKPOINT_EVERY"] = "0"  # always: no checkpoint file (LOG_DIR is the output folder)
    return env, plan


def run_child(name: str, env: dict, out: Path, timeout: float, script: Path = ROOT / "train_gpt.py", cwd: Path = ROOT) -> dict:
    """Run `script` (train_gpt.py, or the --peer script) in `cwd`; echo its console (prefixed, torch logs condensed),
    keep every line with its arrival time."""
    console_path = out / f"{name}.console.txt"
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1,
                            start_new_session=True)

    def pump():
        reason_due = False  # echo the first guard failure after each "Recompiling function" line
        with open(console_path, "w", encoding="utf-8") as f:
            for line in proc.stdout:
                t = time.monotonic() - t0
                line = line.rstrip("\n")
                lines.append((t, line))
                f.write(f"{t:8.2f} {line}\n")
                f.flush()
                if any(tag in line for tag in TORCH_LOG_TAGS):
                    if RECOMPILE in line or GRAPH_BREAK in line or reason_due and guard_failure(line):
                        say(f"[{name}] {t:7.1f}s (torch) {torch_msg(line).strip()[:200]}")
                        reason_due = RECOMPILE in line
                    continue
                say(f"[{name}] {t:7.1f}s {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        stop(proc)
    except KeyboardInterrupt:
        stop(proc)
        raise
    reader.join(timeout=10)
    return dict(rc=proc.returncode, timed_out=timed_out, wall_s=time.monotonic() - t0, lines=list(lines))


def stop(proc: subprocess.Popen) -> None:
    """End the child we started (and its own process group), politely first."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def torch_msg(line: str) -> str:
    """The message of a TORCH_LOGS line (after its '[__artifact] ' tag)."""
    for tag in TORCH_LOG_TAGS:
        if tag in line:
            rest = line.split(tag, 1)[1]
            return rest.split("]", 1)[1][1:] if "]" in rest else rest
    return line


def guard_failure(line: str) -> bool:
    """A '- 0/0: tensor 'x' size mismatch ...' line: why Dynamo recompiled."""
    return "[__recompiles" in line and torch_msg(line).lstrip().startswith("- ")


def first_time(lines, pred):
    return next((t for t, l in lines if pred(l)), None)


def span(a, b):
    return round(b - a, 2) if a is not None and b is not None else None


def rate(n, s):
    return round(n / s, 1) if n and s else None


def finite(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def analyze(preset: str, child: dict, p: dict, plan: dict, dry: bool, hp_defaults: dict, env: dict) -> dict:
    """One run's summary (what the log says, timed by when each line arrived) and its checks."""
    L = child["lines"]
    hp = p["hparams"]
    t_params = first_time(L, lambda l: l.startswith("model_params:"))
    t_warm = first_time(L, lambda l: l.startswith("warmup_steps:") and " done" in l)
    t_train = first_time(L, lambda l: l.startswith("train_done "))
    t_pre = first_time(L, lambda l: l.startswith("pre_quant_exact "))
    t_total = first_time(L, lambda l: l.startswith("total_submission_bytes:"))
    t_rt = first_time(L, lambda l: l.startswith("final_roundtrip_exact "))
    t_sl = first_time(L, lambda l: l.startswith("final_sliding_exact "))
    train_start = t_warm if t_warm is not None else first_time(L, lambda l: l.startswith("step:"))
    rec = [t for t, l in L if RECOMPILE in l]
    reasons = []  # "12.3s Recompiling function forward in ...: - 0/0: <first guard that failed>"
    for t, l in L:
        if RECOMPILE in l and len(reasons) < 8:
            reasons.append(f"{t:.1f}s {torch_msg(l).strip()}")
        elif guard_failure(l) and reasons and ": - " not in reasons[-1]:
            reasons[-1] += f": {torch_msg(l).strip()[:300]}"
    gbs = [t for t, l in L if GRAPH_BREAK in l]
    td, steps = p.get("train_done", {}), p["steps"]
    tokens_per_step = hp.get("train_batch_tokens")
    step_ms = td.get("step_avg_ms")
    qat = p.get("late_qat")
    r: dict = dict(
        ok=child["rc"] == 0 and not child["timed_out"], exit_code=child["rc"], timed_out=child["timed_out"],
        errors=p["errors"],
        config={k: hp.get(k) for k in ("num_layers", "model_dim", "mlp_mult", "train_seq_len", "train_batch_tokens",
                                       "micro_batches", "max_wallclock_seconds", "warmdown_iters", "qat_threshold",
                                       "warmup_steps", "val_max_tokens", "eval_stride", "size_limit_bytes")},
        model_params=p.get("model_params"), attention=p.get("features", {}).get("attention"),
        compile=p.get("features", {}).get("compile"),
        train=dict(steps=td.get("steps"), train_ms=td.get("train_ms"), step_ms=step_ms,
                   tokens_per_step=tokens_per_step,
                   tokens_per_s=round(tokens_per_step / step_ms * 1000, 1) if tokens_per_step and step_ms else None,
                   peak_mem_gib=td.get("peak_mem_gib"),
                   grad_accum_steps=(hp.get("micro_batches") or 0) // ((p.get("versions") or {}).get("world_size") or 1),
                   curve=[[x["step"], x["train_ms"], x["loss"], x["lr_mult"]] for x in steps]),  # step, ms, loss, lr
        qat=dict(enabled=qat is not None, step=(qat or {}).get("step"), lr_mult=(qat or {}).get("lr_mult"),
                 fraction_of_steps=round((td["steps"] - qat["step"]) / td["steps"], 3) if qat and td.get("steps") else None),
        plan=plan,
        phases_s=dict(startup=span(0.0, t_params), compile_and_warmup=span(t_params, t_warm),
                      train=span(train_start, t_train), pre_quant_eval_incl_compile=span(t_train, t_pre),
                      export=span(t_pre, t_total), roundtrip_eval_incl_load_and_compile=span(t_total, t_rt),
                      sliding_eval=span(t_rt, t_sl), total=round(child["wall_s"], 2)),
        torch_logs=dict(recompiles_total=len(rec), graph_breaks=len(gbs),
                        recompiles_during_training=sum(1 for t in rec if train_start is not None and t >= train_start
                                                       and (t_train is None or t <= t_train)),
                        recompiles_during_warmup=sum(1 for t in rec if train_start is not None and t < train_start),
                        recompile_reasons=reasons),
        gptq=p.get("gptq"), size=None, pre_quant=None, roundtrip=None, sliding=None, ttt=None,
    )
    if p.get("pre_quant"):
        # standard eval scores every target once: as many tokens as the round trip reports
        n_val = (p.get("roundtrip") or {}).get("tokens") or max(0, (hp.get("val_max_tokens") or 0) - 1)
        r["pre_quant"] = dict(p["pre_quant"], wall_s_incl_compile=r["phases_s"]["pre_quant_eval_incl_compile"],
                              tokens_per_s_incl_compile=rate(n_val, r["phases_s"]["pre_quant_eval_incl_compile"]))
    # step time before / after late QAT, and the worst interval between two step lines (a recompile stall shows)
    iv = [(a["step"], b["step"], (b["train_ms"] - a["train_ms"]) / (b["step"] - a["step"]))
          for a, b in zip(steps, steps[1:]) if finite(a.get("train_ms"), b.get("train_ms")) and b["step"] > a["step"]]
    if iv:
        med = statistics.median(x for _, _, x in iv)
        worst = max(iv, key=lambda x: x[2])
        r["train"]["interval_ms_per_step"] = dict(median=round(med, 2), max=round(worst[2], 2),
                                                  max_between_steps=[worst[0], worst[1]])

        def seg(sel):
            s = [x for x in iv if sel(x)]
            n = sum(b - a for a, b, _ in s)
            return round(sum((b - a) * x for a, b, x in s) / n, 2) if n else None

        if qat:
            r["qat"]["step_ms_before"] = seg(lambda x: x[1] <= qat["step"])
            r["qat"]["step_ms_after"] = seg(lambda x: x[0] >= qat["step"])
    if "total" in p:
        tot = p["total"]
        r["size"] = dict(total_bytes=tot["bytes"], limit=tot["limit"], status=tot["status"],
                         artifact_bytes=p.get("artifact", {}).get("bytes"), code_bytes=p.get("code_bytes"),
                         export_seconds=p.get("artifact", {}).get("export_seconds"), budget_fit=p.get("budget_fit"),
                         forecast_bytes=(p.get("size_forecast") or {}).get("bytes"),
                         fits_16mb=isinstance(tot["bytes"], int) and tot["bytes"] <= COMPETITION_LIMIT)
    if "roundtrip" in p:
        rt = p["roundtrip"]
        r["roundtrip"] = dict(rt, tokens_per_s_incl_compile=rate(rt.get("tokens"), rt.get("eval_seconds")),
                              quant_gap_bpb=round(rt["val_bpb"] - p["pre_quant"]["val_bpb"], 6)
                              if finite(rt.get("val_bpb"), (p.get("pre_quant") or {}).get("val_bpb")) else None)
    if "sliding" in p:
        r["sliding"] = dict(p["sliding"], **(p.get("sliding_eval") or {}))
    if "ttt" in p:
        r["ttt"] = dict(p["ttt"], **(p.get("ttt_eval") or {}))
    r["checks"] = checks(preset, r, p, dry, hp_defaults, env)
    return r


# keys whose values must be the record defaults for "the default record configuration at full size"
FULL_SIZE_KEYS = ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "TRAIN_SEQ_LEN",
                  "TRAIN_BATCH_TOKENS", "MICRO_BATCHES", "XSA_LAST_N", "BIGRAM_VOCAB_SIZE", "VE_LAYERS", "ROPE_DIMS",
                  "EMA_DECAY", "MUON_BACKEND_STEPS", "EVAL_STRIDE")


def checks(preset, r, p, dry, hp_defaults, env) -> dict:
    """name -> True / False, or None where it does not apply (CUDA-only checks in a dry run)."""
    c = {}
    stride = p["hparams"].get("eval_stride")
    c["completed"] = bool(r["ok"] and r["size"] and r["roundtrip"] and p.get("pre_quant")
                          and (r["sliding"] is not None or not stride))
    c["size_line_ok"] = bool(r["size"] and r["size"]["status"] == "ok")
    bpbs = [x.get("val_bpb") for x in (p.get("pre_quant"), r["roundtrip"], r["sliding"]) if x]
    c["metrics_finite"] = bool(bpbs) and finite(*bpbs) and finite(r["train"]["step_ms"])
    cuda = None if dry else True
    compiled = not dry or env.get("COMPILE") == "1"
    c["compiled"] = r["compile"] == "on" if compiled else None
    c["peak_memory_reported"] = None if dry else finite(r["train"]["peak_mem_gib"])
    c["no_recompile_during_training"] = r["torch_logs"]["recompiles_during_training"] == 0 if compiled else None
    if preset == "record":
        q, g = r["qat"], r["gptq"]
        qat_on = float(p["hparams"].get("qat_threshold") or 0) > 0  # late QAT is optional (off under GPTQ by default)
        c["qat_enabled"] = q["enabled"] if qat_on else None
        c["qat_switched_mid_run"] = bool(q["enabled"] and r["train"]["steps"] and 1 < q["step"] < r["train"]["steps"]) if qat_on else None
        gptq = p["hparams"].get("quant_method") == "gptq"
        c["gptq_calibrated_inside_cap"] = bool(g and g["batches"] and (not g["limit_ms"] or g["train_plus_calibration_ms"] <= g["limit_ms"])) if gptq else None
        c["sliding_eval_ran"] = r["sliding"] is not None
        if cuda:
            c["full_size_record_config"] = all(p["hparams"].get(k.lower()) == value(str(hp_defaults[k])) for k in FULL_SIZE_KEYS)
    return c


# ----------------------------------------------------------------------------- extrapolation
def extrapolate(preset: str, r: dict) -> dict | None:
    step_ms = r["train"]["step_ms"]
    if not finite(step_ms) or step_ms <= 0:
        return None
    mb = r["config"].get("micro_batches") or 8
    e = dict(step_ms_1gpu=step_ms, step_ms_8gpu_compute_only=round(step_ms / N_GPUS, 2),
             steps_in_600s_8gpu_upper_bound=int(TRAIN_BUDGET_S * 1000 // (step_ms / N_GPUS)),
             micro_batches_per_rank_8gpu=mb / N_GPUS)
    if r["train"]["tokens_per_step"]:
        e["train_tokens_per_s_8gpu_upper_bound"] = round(r["train"]["tokens_per_step"] / (step_ms / N_GPUS) * 1000)
    a = ANCHORS.get(preset)
    if a:
        e["public_8xh100_step_ms"] = a["step_ms_8xh100"]
        e["implied_overhead_ms_per_step_at_public_rate"] = round(a["step_ms_8xh100"] - step_ms / N_GPUS, 2)
    sl = r.get("sliding") or {}
    tps = sl.get("tokens_per_s")
    if finite(tps) and tps > 0:
        e["sliding_tokens_per_s_1gpu"] = tps
        if finite(sl.get("full_split_tokens")):
            e["sliding_full_split_s_8gpu"] = round(sl["full_split_tokens"] / (tps * N_GPUS), 1)
            e["full_split_tokens"] = sl["full_split_tokens"]
        e["sliding_fineweb_val_s_8gpu"] = round(FINEWEB_VAL_TOKENS / (tps * N_GPUS), 1)
        if a and "sliding_eval_s_8xh100" in a:
            e["public_sliding_eval_s_8xh100"] = a["sliding_eval_s_8xh100"]
    tt = r.get("ttt") or {}
    if finite(tt.get("tokens_per_s")) and tt["tokens_per_s"] > 0:
        e["ttt_protocol"], e["ttt_tokens_per_s_1gpu"] = tt.get("protocol"), tt["tokens_per_s"]
        e["ttt_fineweb_val_s_8gpu"] = round(FINEWEB_VAL_TOKENS / (tt["tokens_per_s"] * N_GPUS), 1)
    return e


ASSUMPTIONS = [
    "8 GPUs each run MICRO_BATCHES/8 of the same global batch's micro-batches (1 of 8 in the record recipe), each of the "
    "same size as here, so each rank's compute per step is 1/8 of this one-GPU step",
    "step_ms_8gpu ~= step_ms_1gpu/8 + communication (DDP gradient all-reduce, Muon update all-reduce, per-step loss "
    "all-reduce) + work every rank repeats (optimizer element-wise updates, EMA, grad clip, the QAT quantizer per "
    "forward); one GPU cannot measure the communication, so steps_in_600s_8gpu_upper_bound is an upper bound",
    "the 8-GPU sliding eval splits the windows evenly over the ranks: time ~= one-GPU time/8, without model load, "
    "compile and the all-reduce of the sums; sliding_fineweb_val_s_8gpu uses the published 62,021,846-token split",
    "TTT (--env TTT=chunk|doc) likewise: ttt_fineweb_val_s_8gpu = the one-GPU rate x 8 on the same split, without the "
    "gradient all-reduce of each chunk's (or phase's) SGD steps, which one GPU cannot measure",
    "measured on the device named in the summary; an H200 has the H100's compute and ~1.4x its memory bandwidth, so an "
    "H100 is as fast or slightly slower",
    "a run of this length trains a model far from converged (EMA weights still near their initialization): its "
    "val_bpb and artifact size say nothing about a 600 s run",
]


# ----------------------------------------------------------------------------- the plan
PHASE_NAMES = dict(start="start", compile_warmup="compile+warm-up", training="training", calibration="calibration",
                   export="export", evaluations="evaluations", after_training="export+evaluations")


def plan_run(preset: str, hp: dict, seconds: float, val_tokens: int) -> dict:
    """Predicted seconds of each phase of one train_gpt.py run on one H200 (COMPILE_WARMUP_S, PHASE_S)."""
    evals = PHASE_S["eval_fixed"] + 2 * val_tokens / EVAL_TOKENS_PER_S["standard"]
    if hp["EVAL_STRIDE"]:
        evals += val_tokens / EVAL_TOKENS_PER_S["sliding"]
    if hp["TTT"] != "off":
        evals += val_tokens / EVAL_TOKENS_PER_S["ttt"]
    return dict(start=PHASE_S["start"], compile_warmup=COMPILE_WARMUP_S.get(preset, max(COMPILE_WARMUP_S.values())),
                training=float(seconds), calibration=PHASE_S["calibration" if hp["QUANT_METHOD"] == "gptq" else "calibration_rtn"],
                export=PHASE_S["export"], evaluations=round(evals, 1))


def plan_peer(seconds: float) -> dict:
    return dict(start=PHASE_S["start"], compile_warmup=PEER_COMPILE_WARMUP_S, training=float(seconds),
                after_training=PHASE_S["peer_after_training"])


def make_plan(runs: dict, peer: dict | None, lease: float, max_total: float) -> dict:
    """The whole call: each run's phases and total, the peer's, the sum, and whether it fits --lease / --max-total."""
    parts = {name: dict(phases=ph, total=round(sum(ph.values()), 1)) for name, ph in runs.items()}
    if peer is not None:
        parts[PEER] = dict(phases=peer, total=round(sum(peer.values()), 1))
    total = round(sum(p["total"] for p in parts.values()), 1)
    return dict(runs=parts, total_s=total, lease_s=lease, max_total_s=max_total, fits_lease=total <= lease,
                fits_max_total=total <= max_total, device="one H200")


def plan_lines(plan: dict, peer_name: str | None = None) -> list[str]:
    out = ["plan: predicted seconds on one H200 (constants COMPILE_WARMUP_S, PHASE_S, EVAL_TOKENS_PER_S in tools/gpu_check.py)"]
    for name, p in plan["runs"].items():
        ph = " + ".join(f"{PHASE_NAMES[k]} {v:.0f}" for k, v in p["phases"].items())
        label = f"{name} ({peer_name})" if name == PEER and peer_name else name
        out.append(f"  {label}: {ph} = {p['total']:.0f} s")
    out.append(f"  total {plan['total_s']:.0f} s; --lease {plan['lease_s']:.0f} s: {'fits' if plan['fits_lease'] else 'OVER'}; "
               f"--max-total {plan['max_total_s']:.0f} s: " + ("fits" if plan["fits_max_total"] else
                                                              "over (the last runs would be cut or skipped)"))
    return out


# ----------------------------------------------------------------------------- the peer
def resolve_peer(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--peer {path}: no such file")
    if not p.is_file():
        raise UserError(f"--peer {path}: not a file (give the training script itself, e.g. records/.../train_gpt.py)")
    return p.resolve()


def peer_data_view(root: Path, data: dict, val_tokens: int) -> dict:
    """A data folder laid out as public record scripts expect it: datasets/fineweb10B_sp<V>/ holding our training
    shards (symbolic links, same order) as fineweb_train_*.bin and the first val_tokens validation tokens (the prefix
    our runs score) as fineweb_val_000000.bin (and its byte sidecar, if the data has one); tokenizers/ holding a link
    to our tokenizer as fineweb_<V>_bpe.model."""
    import numpy as np
    src, vocab = Path(data["path"]), data["vocab"]
    ds, tk = root / "datasets" / f"fineweb10B_sp{vocab}", root / "tokenizers"
    ds.mkdir(parents=True)
    tk.mkdir()
    train = shards(src, "train")
    for i, f in enumerate(train):
        (ds / f"fineweb_train_{i:06d}.bin").symlink_to(f.resolve())
    for kind, files in (("val", [f for f in shards(src, "val") if "_val_bytes_" not in f.name]),
                        ("val_bytes", sorted(src.glob("*_val_bytes_*.bin")))):
        parts, n = [], 0
        for f in files:
            if n >= val_tokens:
                break
            parts.append(load_data_shard(f)[: val_tokens - n])
            n += len(parts[-1])
        if parts:
            write_shard(ds / f"fineweb_{kind}_000000.bin", np.concatenate(parts))
    tok = tk / f"fineweb_{vocab}_bpe.model"
    tok.symlink_to(Path(data["tokenizer"]).resolve())
    return dict(root=str(root), dataset=str(ds), tokenizer=data["tokenizer"], train_shards=len(train),
                val_tokens=min(val_tokens, data["val_tokens"]))


def write_standin(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flash_attn_interface.py").write_text(FA3_STANDIN, encoding="utf-8")
    return folder


def peer_env(view: dict, ours: dict, seconds: float, val_tokens: int, cwd: Path) -> dict:
    """The variables of PEER_ENV_DOC (same names, same order) from our first run's resolved settings `ours`."""
    env = dict(DATA_PATH=view["dataset"], DATASETS_DIR=view["dataset"], DATA_DIR=view["root"],
               TOKENIZER_PATH=view["tokenizer"], VOCAB_SIZE=str(ours["VOCAB_SIZE"]),
               TRAIN_BATCH_TOKENS=str(ours["TRAIN_BATCH_TOKENS"]), MICRO_BATCHES=str(ours["MICRO_BATCHES"]),
               TRAIN_SEQ_LEN=str(ours["TRAIN_SEQ_LEN"]),
               EVAL_SEQ_LEN=str(ours["EVAL_SEQ_LEN"] or ours["TRAIN_SEQ_LEN"]), MAX_WALLCLOCK_SECONDS=str(seconds),
               VAL_MAX_TOKENS=str(val_tokens), TRAIN_LOG_EVERY=str(ours["TRAIN_LOG_EVERY"]), VAL_LOSS_EVERY="0",
               CHECKPOINT_EVERY="0", RUN_ID=PEER, LOG_DIR=str(cwd), ARTIFACT_DIR=str(cwd))
    assert list(env) == [k for k, _ in PEER_ENV_DOC]
    return env


_PEAK_MIB = re.compile(r"peak memory allocated:\s*(\d+)\s*MiB")


def run_timing(lines: list[tuple[float, str]], batch_tokens: int | None, log_lines=()) -> dict:
    """Training speed of any training script from its console lines (arrival second, text), read by the shared
    parser (tools/logparse.py: this project's logs and every public record era):
      step_ms: average ms per step: train_time / steps of the `train_done` or `stopping_early:` line, else the last
        step line's step_avg, else TRAIN_BATCH_TOKENS / its tok/s (`N/M train_loss: ... train_time: 3.2m tok/s: R`,
        a running average), else its train_time / step;
      tokens_per_s: TRAIN_BATCH_TOKENS (as the log states it, else `batch_tokens`) / step_ms;
      compile_s: compile + warm-up, from the model_params line (else the process start) to the start of training: the
        first step line's arrival less the training time it reports (step x batch / tok/s where the line has tok/s, as
        `train_time: 0.0m` is too coarse);
      logged: train_batch_tokens and train_seq_len as the run states them (console or `log_lines`, its log file's);
      roundtrip: the last round-trip score of the quantized model (final_*roundtrip*, `quantized`, `diagnostic
        quantized`; not a pre-quant `post_ema` line), and metric: the log's submission metric."""
    lg = Log.from_lines([l for _, l in lines])
    logged = {}
    for line in [l for _, l in lines] + list(log_lines):
        t = tokens(line)
        for k in ("train_batch_tokens", "train_seq_len"):
            if k in t and k not in logged and num(t[k]) is not None:
                logged[k] = int(num(t[k]))
    batch = logged.get("train_batch_tokens") or batch_tokens
    points = []  # (arrival, entry, tok/s) of each training step line
    for at, line in lines:
        one = Log.from_lines([line]).train
        if one:
            points.append((at, one[0], num(tokens(line).get("tok/s"))))
    r: dict = dict(steps=lg.steps if points or lg.train_done else None, step_ms=None, tokens_per_s=None, compile_s=None,
                   batch_tokens=batch, logged=logged, source=None)
    if lg.train_done and lg.step_avg_ms:
        r["step_ms"], r["source"] = lg.step_avg_ms, "train_done"
    elif points:
        _, e, tps = points[-1]
        if e["step_avg_ms"]:
            r["step_ms"], r["source"] = e["step_avg_ms"], "step_avg"
        elif tps and batch:
            r["step_ms"], r["source"] = batch / tps * 1000, "tok/s"
        elif e["time_ms"] and e["step"]:
            r["step_ms"], r["source"] = e["time_ms"] / e["step"], "train_time"
    if r["step_ms"]:
        r["step_ms"] = round(r["step_ms"], 3)
        r["tokens_per_s"] = round(batch / r["step_ms"] * 1000, 1) if batch else None
    if points:
        at, e, tps = points[0]
        trained = e["step"] * batch / tps if tps and batch else (e["time_ms"] or 0) / 1000
        t0 = next((a for a, l in lines if l.startswith("model_params")), 0.0)
        r["compile_s"] = round(max(0.0, at - trained - t0), 2)
        r["compile_from"] = "model_params" if t0 else "process start"
    if "peak_mem_gib" in lg.train_done:
        r["peak_mem_gib"] = num(lg.train_done["peak_mem_gib"])
    elif m := next((_PEAK_MIB.search(l) for _, l in lines if _PEAK_MIB.search(l)), None):
        r["peak_mem_gib"] = round(int(m.group(1)) / 1024, 2)
    rt = [s for s in lg.scores if s["kind"] == "roundtrip" and re.search(r"roundtrip|quant", s["name"], re.I)]
    r["roundtrip"] = dict(name=rt[-1]["name"], val_bpb=rt[-1]["val_bpb"], val_loss=rt[-1]["val_loss"]) if rt else None
    m = lg.metric
    r["metric"] = dict(name=m["name"], kind=m["kind"], val_bpb=m["val_bpb"]) if m else None
    return r


def ratio(a, b):
    return round(a / b, 3) if finite(a, b) and b else None


def peer_lines(pr: dict) -> list[str]:
    """The peer comparison as printed: our run, the peer, and the one `peer_ratio` line (ours / peer)."""
    def facts(t):
        rt = (t.get("roundtrip") or {}).get("val_bpb")
        return (f"step_ms:{fmt(t.get('step_ms'), '.1f')} tokens_per_s:{fmt(t.get('tokens_per_s'), '.0f')} "
                f"compile_s:{fmt(t.get('compile_s'), '.1f')} roundtrip_bpb:{fmt(rt, '.4f')}")
    if pr.get("skipped"):
        return [f"peer {pr['script_name']}: skipped ({pr['skipped']})"]
    q = pr["ratio"]
    return [f"peer ours={pr['ours']['preset']}: {facts(pr['ours'])} attention:{fmt(pr['ours'].get('attention'))}",
            f"peer {pr['script_name']}: {facts(pr['peer'])} attention:{pr['attention']}"
            + ("" if pr["ok"] else " (FAILED)") + (" (stopped at --max-total)" if pr["timed_out"] else ""),
            f"peer_ratio tokens_per_s:{fmt(q['tokens_per_s'])} step_ms:{fmt(q['step_ms'])} compile_s:{fmt(q['compile_s'])}"]


# ----------------------------------------------------------------------------- large files
def large_files(folder: Path, limit: int = LARGE_FILE_BYTES) -> list[Path]:
    """Plain files under `folder` (links not followed) over `limit` bytes."""
    found = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = Path(dirpath) / name
            try:
                if not p.is_symlink() and p.stat().st_size > limit:
                    found.append(p)
            except OSError:
                pass
    return sorted(found)


def remove_large_files(folder: Path, limit: int = LARGE_FILE_BYTES) -> list[dict]:
    """Delete what large_files finds; return [{file, bytes}] of what went."""
    gone = []
    for p in large_files(folder, limit):
        size = p.stat().st_size
        p.unlink(missing_ok=True)
        gone.append(dict(file=str(p.relative_to(folder)), bytes=size))
    return gone


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="run the same logic on the CPU at SMOKE size (seconds)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: $OUT if set, else logs/gpu_check); nothing over "
                   f"{LARGE_FILE_BYTES:,} bytes may be in it before, and nothing that large stays in it after")
    p.add_argument("--seconds", type=float, help=f"training wall-clock per preset (default {GPU_DEFAULTS['seconds']:g}; "
                   f"dry run: a {DRY_DEFAULTS['seconds']:g} s cap on {DRY_ITERATIONS} steps)")
    p.add_argument("--data", metavar="DIR", help="shards (*_train_*.bin, *_val_*.bin); default FineWeb in data/ if "
                   "present, else the embedded stdlib sample")
    p.add_argument("--tokenizer", metavar="MODEL", help="SentencePiece model of --data (default: from its manifest.json)")
    p.add_argument("--val-tokens", type=int, help=f"validation prefix to evaluate (default {GPU_DEFAULTS['val_tokens']:,}; "
                   f"dry run {DRY_DEFAULTS['val_tokens']:,}); capped at what the split has")
    p.add_argument("--presets", default="record", help="comma-separated train_gpt.py presets, run in this order on the "
                   "same card (default record: one preset per call, as one compile takes minutes of a device lease; "
                   "e.g. record,baseline)")
    p.add_argument("--wheels", metavar="DIR", help="install DIR/*.whl (e.g. zstandard, brotli) into a temporary folder for the runs")
    p.add_argument("--size-limit", type=int, help=f"SIZE_LIMIT_BYTES for the runs (default {GPU_DEFAULTS['size_limit']:,}: "
                   "a short run does not compress under 16,000,000 yet; the summary still reports fits_16mb. "
                   f"Dry run: {COMPETITION_LIMIT:,})")
    p.add_argument("--max-total", type=float, help=f"stop (and skip runs) so the whole check ends within this many "
                   f"seconds (default {GPU_DEFAULTS['max_total']:g}, under the device tool's 600 s per command)")
    p.add_argument("--compile", action="store_true", help="dry run only: COMPILE=1 (inductor on the CPU, minutes) to "
                   "exercise the compile and recompile checks")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train_gpt.py variable for every run of ours (repeatable), e.g. --env WARMUP_STEPS=5")
    p.add_argument("--peer", metavar="SCRIPT", help="after our runs, run SCRIPT (e.g. a public record's train_gpt.py) "
                   "on the same card, shards, global batch, sequence length and wall-clock as our first preset, with the "
                   "same attention kernel (without FlashAttention 3: SDPA for both, the peer through a flash_attn_interface "
                   "stand-in); prints `peer_ratio tokens_per_s:X step_ms:Y compile_s:Z` (ours / peer)")
    p.add_argument("--peer-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra variable for the peer only (repeatable), e.g. --peer-env TTT_ENABLED=0")
    p.add_argument("--plan", action="store_true", help="print the predicted seconds of each phase and the total, check "
                   "them against --lease, and stop without running (the plan is printed before every run too)")
    p.add_argument("--lease", type=float, default=LEASE_S - LEASE_MARGIN_S, metavar="SECONDS",
                   help=f"refuse (exit 2) when the plan's total exceeds this (default {LEASE_S - LEASE_MARGIN_S:g}: a "
                   f"{LEASE_S / 60:g}-minute device lease less {LEASE_MARGIN_S:g} s for the machine's start and transfers)")
    return p


def key_values(items: list[str], flag: str) -> dict:
    out = {}
    for kv in items:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise UserError(f"{flag} {kv!r}: expected KEY=VALUE")
        out[k.upper()] = v
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    dry = args.cpu_dry_run
    d = DRY_DEFAULTS if dry else GPU_DEFAULTS
    for k in ("seconds", "val_tokens", "size_limit", "max_total"):
        if getattr(args, k) is None:
            setattr(args, k, d[k])
    out = Path(args.out or os.environ.get("OUT") or ROOT / "logs" / "gpu_check").resolve()  # the children run in ROOT
    work = site = peer = None
    try:
        if args.seconds <= 0 or args.val_tokens <= 0 or args.size_limit <= 0 or args.lease <= 0:
            raise UserError("--seconds, --val-tokens, --size-limit and --lease must be positive")
        overrides, peer_overrides = key_values(args.env, "--env"), key_values(args.peer_env, "--peer-env")
        if "CHECKPOINT_EVERY" in overrides:
            raise UserError("--env CHECKPOINT_EVERY: the check's runs always use CHECKPOINT_EVERY=0 (no checkpoint files)")
        if peer_overrides and not args.peer:
            raise UserError("--peer-env needs --peer SCRIPT")
        peer = resolve_peer(args.peer) if args.peer else None
        if not args.plan and out.is_dir():
            big = large_files(out)
            if big:
                raise UserError(f"--out {out} already holds {len(big)} file(s) over {LARGE_FILE_BYTES:,} bytes "
                                 f"({', '.join(p.name for p in big[:3])}); this check leaves nothing that large in its "
                                 "output: move them or choose another folder")
        site = install_wheels(args.wheels) if args.wheels else None
        if site is not None:
            sys.path.insert(0, str(site))
        check_packages()
        sys.path.insert(0, str(ROOT))
        import torch
        import train_gpt as T
        hp_defaults = {k: v for k, v, _ in T.HPARAMS}
        hparam_names = {k.lower() for k in hp_defaults} | {"preset", "smoke"}
        presets = [x.strip() for x in args.presets.split(",") if x.strip()]
        bad = [x for x in presets if x not in T.PRESETS]
        if not presets or bad:
            raise UserError(f"--presets {args.presets!r}: choose from {', '.join(T.PRESETS)}")
        unknown = [k for k in overrides if k not in hp_defaults]
        if unknown:
            raise UserError(f"--env {', '.join(unknown)}: not a train_gpt.py variable")
        fa3 = importlib.util.find_spec("flash_attn_interface") is not None
        standin = peer is not None and (dry or not fa3)  # on the CPU no FlashAttention runs: the stand-in always
        run_overrides = dict(overrides)
        if standin and "ATTN" not in overrides:
            run_overrides["ATTN"] = "sdpa"  # the peer runs SDPA through the stand-in: ours too (not FlexAttention)
        data = resolve_data(args)
        args.val_tokens_used = min(args.val_tokens, data["val_tokens"])
        runs = {}
        for preset in presets:
            env, plan = preset_env(preset, args, data, dry, hp_defaults | T.PRESETS[preset], run_overrides)
            try:
                runs[preset] = dict(env=env, plan=plan, hp=T.parse_hparams(env))
            except T.UserError as e:
                raise UserError(f"--env: {e}") from None
        the_plan = make_plan({k: plan_run(k, r["hp"], args.seconds, args.val_tokens_used) for k, r in runs.items()},
                             plan_peer(args.seconds) if peer else None, args.lease, args.max_total)
        shown = plan_lines(the_plan, peer.name if peer else None)
        for line in shown:
            say(line)
        if not the_plan["fits_lease"]:
            each = ", ".join(f"{k} {v['total']:.0f} s" for k, v in the_plan["runs"].items())
            raise UserError(f"the plan needs {the_plan['total_s']:.0f} s on one H200 ({each}) but --lease is "
                             f"{args.lease:g} s: run fewer presets, shorten --seconds, or raise --lease")
        if args.plan:
            if site is not None:
                shutil.rmtree(site, ignore_errors=True)
            return 0
        if dry:
            gpu = None
        else:
            if not torch.cuda.is_available():
                raise UserError(f"no CUDA device visible to torch {torch.__version__} ({sys.executable}); run on the GPU "
                                 "machine, or use --cpu-dry-run to test this script's logic on the CPU")
            gpu = gpu_probe(torch)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name in OUT_FILES + (f"{PEER}.txt", f"{PEER}.console.txt"):
                (out / name).unlink(missing_ok=True)
            say.file = open(out / "gpu_check.txt", "w", encoding="utf-8")
            say.file.write("\n".join(shown) + "\n")
        except OSError as e:
            raise UserError(f"cannot write the output folder {out}: {e.strerror}") from None
        work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        base_env = child_base_env(site, dry, hparam_names)
        base_env["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")  # one compile cache for every run of this call
        view = standin_dir = None
        if peer is not None:
            try:
                view = peer_data_view(work / "peer_data", data, args.val_tokens_used)
            except OSError as e:
                raise UserError(f"cannot build the peer's data folder in {work}: {e.strerror or e}") from None
            standin_dir = write_standin(work / "fa3_standin") if standin else None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if say.file:
            say.file.write(f"error: {e}\n")
        for d in (work, site):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        return 2

    summary = dict(
        version=1, mode="cpu-dry-run" if dry else "gpu", ok=False, partial=True,
        host=dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda, executable=sys.executable,
                  wheels_site=str(site) if site else None, gpu=gpu, fa3_importable=fa3),
        data=data["label"], data_info=dict(data, val_tokens_used=args.val_tokens_used),
        settings=dict(seconds=args.seconds, val_tokens=args.val_tokens_used, size_limit=args.size_limit,
                      presets=presets, env_overrides=overrides, max_total_s=args.max_total, lease_s=args.lease,
                      checkpoint_every=0, inductor_cache="one temporary folder for every run of the call, deleted after",
                      attention_set_for_peer=run_overrides.get("ATTN") if "ATTN" not in overrides else None,
                      peer=str(peer) if peer else None, peer_env_overrides=peer_overrides,
                      expected_step_ms_1gpu=None if dry else {k: EXPECTED_STEP_MS[k] for k in presets if k in EXPECTED_STEP_MS}),
        plan=the_plan, runs={}, peer=None,
        extrapolation=dict(assumptions=ASSUMPTIONS, n_gpus=N_GPUS, train_budget_s=TRAIN_BUDGET_S, eval_budget_s=EVAL_BUDGET_S),
        checks={}, failures=[], removed_large_files=[], out=str(out),
    )
    say(f"gpu_check: {summary['mode']} on {gpu['device'] if gpu else 'cpu'}, torch {torch.__version__}, "
        f"data {data['label']} ({data['path']}: {data['train_tokens']:,} train / {data['val_tokens']:,} val tokens, "
        f"using {args.val_tokens_used:,}), presets {','.join(presets)}, {args.seconds:g} s each, out {out}"
        + (f", peer {peer}" if peer else ""))
    if gpu:
        say(f"gpu: {json.dumps(gpu)}")
    if summary["settings"]["attention_set_for_peer"]:
        say("attention: ATTN=sdpa for our runs, as the peer runs SDPA through the flash_attn_interface stand-in")
    deadline = t_start + args.max_total
    overhead = None
    lines_of = {}  # preset -> its console lines (arrival, text), for the peer comparison
    try:
        for preset in presets:
            env, plan = runs[preset]["env"], runs[preset]["plan"]
            remaining = deadline - time.monotonic()
            # training + the fixed part (start, compile, warm-up, evals, export) of the previous run, or the plan's
            need = 10 if dry else args.seconds + (overhead if overhead is not None else
                                                  the_plan["runs"][preset]["total"] - args.seconds)
            if remaining < need:
                msg = f"{preset}: skipped, {remaining:.0f} s left of --max-total {args.max_total:g} (needs > {need:.0f} s)"
                say(msg)
                summary["failures"].append(msg)
                summary["runs"][preset] = dict(ok=False, skipped=True)
                continue
            for name in (f"{preset}.txt", f"{preset}.console.txt"):
                (out / name).unlink(missing_ok=True)
            env.update(LOG_DIR=str(out), RUN_ID=preset, ARTIFACT=str(work / f"{preset}.ptz"))
            say(f"--- {preset}: " + " ".join(f"{k}={v}" for k, v in env.items() if k not in ("DATA_PATH", "TOKENIZER_PATH", "LOG_DIR", "ARTIFACT")))
            child = run_child(preset, base_env | env, out, remaining - 15)
            lines_of[preset] = child["lines"]
            p = parse_log(run_log(str(out / f"{preset}.txt"), [l for _, l in child["lines"]]), hparam_names)
            p["recompiles"] = sum(RECOMPILE in l for _, l in child["lines"])  # torch logs go to the console only
            r = analyze(preset, child, p, plan, dry, hp_defaults, env)
            summary["runs"][preset] = r
            if r["ok"] and finite(r["train"]["train_ms"]):
                overhead = 0.8 * (child["wall_s"] - r["train"]["train_ms"] / 1000)  # the record's is the larger
            ex = extrapolate(preset, r)
            if ex:
                summary["extrapolation"][preset] = ex
            for k, v in r["checks"].items():
                summary["checks"][f"{preset}.{k}"] = v
            if not r["ok"]:
                why = "timed out (--max-total)" if child["timed_out"] else f"exit status {child['rc']}"
                summary["failures"].append(child_failed(preset, why, child, p["errors"], out))
            write_summary(out, summary)
        if peer is not None:
            ours = next((k for k in presets if summary["runs"][k].get("ok")), None)
            pr = dict(script=str(peer), script_name=peer.name, skipped=None)
            if ours is None:
                pr["skipped"] = "no run of ours succeeded, nothing to compare with"
            else:
                pr = run_peer(peer, args, dry, ours, runs[ours]["hp"], summary["runs"][ours], lines_of[ours], view,
                              standin_dir, base_env, peer_overrides, work, out, deadline)
            summary["peer"] = pr
            if pr.get("skipped"):
                summary["failures"].append(f"peer {peer.name}: skipped ({pr['skipped']})")
            summary["failures"] += pr.get("failures", [])
            write_summary(out, summary)
    except KeyboardInterrupt:
        summary["failures"].append("interrupted")
    finally:
        for d in (work, site):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
    summary["removed_large_files"] = remove_large_files(out)
    for f in summary["removed_large_files"]:
        say(f"removed {out / f['file']} ({f['bytes']:,} bytes): nothing over {LARGE_FILE_BYTES:,} bytes stays in --out")
    failed = [k for k, v in summary["checks"].items() if v is False]
    summary["failures"] += [f"check failed: {k}" for k in failed]
    if {"record", "baseline"} <= summary["runs"].keys():
        a, b = (summary["runs"][k].get("train", {}).get("step_ms") for k in ("record", "baseline"))
        if finite(a, b) and b:
            summary["comparison"] = dict(record_over_baseline_step_ms=round(a / b, 3))
    summary["partial"] = False
    summary["ok"] = not summary["failures"] and all(r.get("ok") for r in summary["runs"].values())
    summary["wall_seconds"] = round(time.monotonic() - t_start, 1)
    write_summary(out, summary)
    report(summary)
    return 0 if summary["ok"] else 1


def child_failed(name: str, why: str, child: dict, errors: list[str], out: Path) -> str:
    """Say that a child run failed, with its last lines; return the failure message."""
    last = (errors or [l for _, l in child["lines"] if l.strip() and not any(t in l for t in TORCH_LOG_TAGS)] or ["(no output)"])[-1]
    msg = f"{name} run failed ({why}): {last.strip()[:300]}"
    say(f"error: {msg}")
    say(f"  last lines of {out / (name + '.console.txt')}:")
    for _, l in [x for x in child["lines"] if not any(t in x[1] for t in TORCH_LOG_TAGS)][-15:]:
        say(f"    {l}")
    return msg


def run_peer(peer: Path, args, dry: bool, ours: str, ours_hp: dict, ours_run: dict, ours_lines, view: dict,
             standin_dir: Path | None, base_env: dict, peer_overrides: dict, work: Path, out: Path, deadline: float) -> dict:
    """Run the --peer script as a child (cwd: a temporary folder), then compare its speed with our run `ours`."""
    pr = dict(script=str(peer), script_name=peer.name, ok=False, skipped=None, exit_code=None, timed_out=False,
              wall_s=None, standin=standin_dir is not None, standin_imported=False, attention=None, env={},
              extra_env=peer_overrides, data={k: view[k] for k in ("train_shards", "val_tokens")}, ours={}, peer={},
              ratio=dict(tokens_per_s=None, step_ms=None, compile_s=None), same_global_batch=None, same_seq_len=None,
              failures=[])
    remaining = deadline - time.monotonic()
    need = DRY_PEER_NEED_S if dry else PHASE_S["start"] + PEER_COMPILE_WARMUP_S + args.seconds
    if remaining < need:
        pr["skipped"] = f"{remaining:.0f} s left of --max-total {args.max_total:g}, needs > {need:.0f} s"
        return pr
    cwd = work / "peer_run"
    cwd.mkdir()
    env = peer_env(view, ours_hp, args.seconds, args.val_tokens_used, cwd)
    pr["env"] = dict(env)
    full = dict(base_env) | (DRY_ENV if dry else {}) | env | peer_overrides
    if standin_dir is not None:
        full["PYTHONPATH"] = os.pathsep.join([str(standin_dir)] + ([full["PYTHONPATH"]] if full.get("PYTHONPATH") else []))
    say(f"--- {PEER}: {peer} " + " ".join(f"{k}={v}" for k, v in env.items() if k not in ("DATA_DIR", "LOG_DIR", "ARTIFACT_DIR"))
        + "".join(f" {k}={v}" for k, v in peer_overrides.items()))
    child = run_child(PEER, full, out, remaining - 15, script=peer, cwd=cwd)
    log_lines = []
    for log in (cwd / f"{PEER}.txt", cwd / "logs" / f"{PEER}.txt"):  # this project's LOG_DIR, public records' logs/
        if log.is_file() and log.stat().st_size <= LARGE_FILE_BYTES:
            shutil.copyfile(log, out / f"{PEER}.txt")
            log_lines = run_log(str(log)).lines
            break
    texts = [l for _, l in child["lines"]]
    pr.update(exit_code=child["rc"], timed_out=child["timed_out"], wall_s=round(child["wall_s"], 2),
              standin_imported=any(STANDIN_MARKER in l for l in texts))
    if standin_dir is not None:
        pr["attention"] = ("SDPA through the flash_attn_interface stand-in (" +
                           ("dry run on the CPU" if dry else "FlashAttention 3 is not importable here") + ")"
                           if pr["standin_imported"] else "its own (it did not import flash_attn_interface)")
    else:
        pr["attention"] = "FlashAttention 3 (flash_attn_interface as installed)"
    pr["ours"] = dict(preset=ours, attention=ours_run.get("attention"),
                      **run_timing(ours_lines, ours_hp["TRAIN_BATCH_TOKENS"], run_log(str(out / f"{ours}.txt")).lines))
    pr["peer"] = run_timing(child["lines"], ours_hp["TRAIN_BATCH_TOKENS"], log_lines)
    a, b = pr["ours"], pr["peer"]
    pr["ratio"] = {k: ratio(a[k], b[k]) for k in ("tokens_per_s", "step_ms", "compile_s")}
    logged = b["logged"]
    if "train_batch_tokens" in logged:
        pr["same_global_batch"] = logged["train_batch_tokens"] == ours_hp["TRAIN_BATCH_TOKENS"]
    if "train_seq_len" in logged:
        pr["same_seq_len"] = logged["train_seq_len"] == ours_hp["TRAIN_SEQ_LEN"]
    for k, same in (("train_batch_tokens", pr["same_global_batch"]), ("train_seq_len", pr["same_seq_len"])):
        if same is False:
            pr["failures"].append(f"peer {peer.name}: its log says {k}:{logged[k]}, ours is {ours_hp[k.upper()]} "
                                  f"(it does not read {k.upper()}): the comparison is not like for like")
    pr["ok"] = b["step_ms"] is not None and (child["rc"] == 0 or child["timed_out"])
    if not pr["ok"]:
        why = "timed out (--max-total)" if child["timed_out"] else f"exit status {child['rc']}"
        if child["rc"] == 0:
            why = "no training step line it could read"
        pr["failures"].append(child_failed(PEER, why, child, [], out))
    return pr


def write_summary(out: Path, summary: dict) -> None:
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n", what="summary")


def fmt(x, spec=""):
    return "-" if x is None else format(x, spec) if spec and isinstance(x, (int, float)) else str(x)


def report(s: dict) -> None:
    say("")
    say(f"=== gpu_check {s['mode']}: data {s['data']}, {s['settings']['seconds']:g} s per preset, "
        f"{s['wall_seconds']:g} s in all ===")
    say(f"{'preset':9}{'steps':>6}{'ms/step':>9}{'tok/s':>11}{'peakGiB':>8} {'attn':5}{'comp':5}{'QAT@':>6}{'QATms':>12}"
        f"{'pre bpb':>8}{'rt bpb':>8}{'slide':>8}{'total bytes':>12} size")
    for name, r in s["runs"].items():
        if r.get("skipped"):
            say(f"{name:9} skipped")
            continue
        t, q, z = r["train"], r["qat"], r["size"] or {}
        qms = f"{fmt(q.get('step_ms_before'), '.0f')}->{fmt(q.get('step_ms_after'), '.0f')}" if q.get("enabled") else "-"
        say(f"{name:9}{fmt(t['steps']):>6}{fmt(t['step_ms'], '.1f'):>9}{fmt(t['tokens_per_s'], ',.0f'):>11}"
            f"{fmt(t['peak_mem_gib'], '.1f'):>8} {fmt(r['attention']):5}{fmt(r['compile']):5}{fmt(q['step']):>6}{qms:>12}"
            f"{fmt((r['pre_quant'] or {}).get('val_bpb'), '.4f'):>8}{fmt((r['roundtrip'] or {}).get('val_bpb'), '.4f'):>8}"
            f"{fmt((r['sliding'] or {}).get('val_bpb'), '.4f'):>8}{fmt(z.get('total_bytes')):>12} "
            f"{fmt(z.get('status'))}{'' if z.get('fits_16mb') is None else ' fits16MB' if z['fits_16mb'] else ' >16MB'}")
        ph = " ".join(f"{k}:{fmt(v, '.1f')}" for k, v in r["phases_s"].items())
        say(f"{'':9}phases_s {ph}")
        if r.get("gptq"):
            g = r["gptq"]
            say(f"{'':9}gptq calibration {fmt(g['batches'])} batches {fmt(g['seconds'], '.2f')} s, train+calibration "
                f"{fmt(g['train_plus_calibration_ms'])} ms of {fmt(g['limit_ms'])}; quantize {fmt(g['quantize_seconds'])} s")
        tl = r["torch_logs"]
        say(f"{'':9}recompiles {tl['recompiles_total']} (training {tl['recompiles_during_training']}), graph breaks "
            f"{tl['graph_breaks']}; roundtrip {fmt((r['roundtrip'] or {}).get('tokens_per_s_incl_compile'), ',.0f')} tok/s "
            f"(incl. compile), sliding {fmt((r['sliding'] or {}).get('tokens_per_s'), ',.0f')} tok/s")
    for name in s["runs"]:
        e = s["extrapolation"].get(name)
        if e:
            line = (f"8 GPUs x 600 s, {name}: <= {e['steps_in_600s_8gpu_upper_bound']:,} steps (>= {e['step_ms_8gpu_compute_only']} "
                    f"ms/step + communication, not measurable on one GPU)")
            if "public_8xh100_step_ms" in e:
                line += f"; public 8xH100: {e['public_8xh100_step_ms']} ms/step"
            if "sliding_fineweb_val_s_8gpu" in e:
                line += f"; sliding eval of the full FineWeb val ~{e['sliding_fineweb_val_s_8gpu']} s"
            if "ttt_fineweb_val_s_8gpu" in e:
                line += f"; TTT={e['ttt_protocol']} ~{e['ttt_fineweb_val_s_8gpu']} s (+ its all-reduces)"
            say(line)
    if s.get("peer"):
        for line in peer_lines(s["peer"]):
            say(line)
    bad = [k for k, v in s["checks"].items() if v is False]
    say(f"checks: {sum(v is True for v in s['checks'].values())} passed, {len(bad)} failed"
        + (f" ({', '.join(bad)})" if bad else "") + f", {sum(v is None for v in s['checks'].values())} n/a")
    for f in s["failures"]:
        say(f"FAILED: {f}")
    say(f"{'OK' if s['ok'] else 'NOT OK'}: summary {Path(s['out']) / 'summary.json'}")


if __name__ == "__main__":
    cli(main, code=2)  # setup errors: one line, exit status 2
