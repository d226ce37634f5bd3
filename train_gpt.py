"""Parameter-golf reference script: train a small GPT, export a mixed int6/int8 + zstd artifact, score it.

Run:  torchrun --standalone --nproc_per_node=8 train_gpt.py          (record recipe, 600 s cap)
      SMOKE=1 python train_gpt.py                                      (tiny CPU run on the sample data)
      EVAL_ONLY=1 ARTIFACT=final.ptz torchrun ... train_gpt.py         (re-score an artifact)
Every setting is an environment variable (HPARAMS below). Importing this file has no side effects. `run` near the end
is the table of contents: configuration -> train -> calibrate -> export -> reload from disk -> score. The sections
follow that data flow; each one's header lists what it holds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import hashlib
import io
import json
import lzma
import math
import os
import platform
import signal
import struct
import sys
import threading
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

try:  # FlashAttention 3 (Hopper) when installed; PyTorch SDPA otherwise
    from flash_attn_interface import flash_attn_func as _fa3
except ImportError:
    _fa3 = None
try:  # FlexAttention (torch >= 2.5): fused block-sparse kernels for the causal and the document mask
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


# The challenge's limits and the log's code-block markers, defined here once. data/common.py reads these, FREE_SETTINGS,
# SHARD_* and BOS_ID from this file's text (never importing it): keep them plain literals.
LIMIT_BYTES = 16_000_000  # code + artifact bytes, decimal
LIMIT_SECONDS = 600.0  # training time on 8 GPUs, and separately evaluation time
CODE_HEAD = "==== code: {name} code_bytes:{n} sha256:{sha} ===="  # the log starts with the script, byte for byte
CODE_END = "==== end of code ===="
# ----------------------------------------------------------------------------- configuration
# Settings (HPARAMS, PRESETS, SMOKE), resolved once into a read-only Config (resolve_config) with its derived values.
# (ENV_NAME, default, what it does). The type is the default's type; lists are comma-separated strings.
HPARAMS = [
    ("DATA_PATH", "./data/datasets/fineweb10B_sp1024", "directory with *_train_*.bin and *_val_*.bin shards"),
    ("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model: byte counts for val_bpb"),
    ("RUN_ID", "", "name of the log and artifact (default: random)"),
    ("LOG_DIR", "logs", "where the log and the artifact are written"),
    ("ARTIFACT", "", "artifact path (default LOG_DIR/RUN_ID.ptz); the file EVAL_ONLY reads"),
    ("EVAL_ONLY", 0, "1: load ARTIFACT and evaluate it, no training"),
    ("SEED", 1337, "random seed"),
    ("COMPILE", -1, "torch.compile the model: 1 on, 0 off, -1 on for CUDA only"),
    ("FUSED_CE", 0, "1: training's softcapped cross-entropy chunk by chunk, logits recomputed in the backward pass instead of kept (memory)"),
    ("ATTN", "auto", "attention kernel: fa3 (FlashAttention 3), flex (FlexAttention: fused causal and document masks), sdpa; auto: fa3 if installed, else flex, on CUDA; sdpa on CPU"),
    ("AUTOCAST", "auto", "bf16: autocast, Newton-Schulz and its all-gather in bf16 (the GPU path, also on CPU); off: fp32; auto: bf16 on CUDA only"),
    ("CHECKPOINT_EVERY", "600s", "write LOG_DIR/RUN_ID.ckpt every N steps, or every N seconds of training with a trailing s (0 = only on SIGTERM/SIGINT)"),
    ("RESUME", "", "auto: continue from LOG_DIR/RUN_ID.ckpt if present (needs RUN_ID); or a checkpoint path; '' = start at step 0"),
    # model
    ("VOCAB_SIZE", 1024, "vocabulary size; unless set, it follows the tokenizer at TOKENIZER_PATH"),
    ("NUM_LAYERS", 11, "transformer blocks"),
    ("MODEL_DIM", 512, "residual width"),
    ("NUM_HEADS", 8, "query heads"),
    ("NUM_KV_HEADS", 4, "key/value heads (grouped-query attention)"),
    ("MLP_MULT", 3, "MLP hidden width = MLP_MULT * MODEL_DIM"),
    ("MLP_ACT", "relu2", "MLP activation: relu2 = relu(x)^2; leaky2 = leaky_relu(x, 0.5)^2 keeps a gradient for x < 0"),
    ("LOGIT_SOFTCAP", 30.0, "logits = cap * tanh(logits / cap): keeps early logits tame"),
    ("ROPE_BASE", 10000.0 * 2.0 ** (16 / 14), "RoPE base: the 1.1233 record's 10000, NTK-scaled from length 1024 to 2048 on 16 dims"),
    ("ROPE_DIMS", 16, "partial RoPE: rotate only the first N dims of each head (0 = all)"),
    ("QK_GAIN_INIT", 1.5, "initial per-head gain on the RMS-normalized queries"),
    ("XSA_LAST_N", 4, "exclusive self-attention on the last N layers: remove each output's own-value component"),
    ("LN_SCALE", 1, "scale block-input norms by 1/sqrt(layer+1): damps deep layers early"),
    ("SMEAR_GATE", 1, "mix the previous position's embedding in: 1 = x + g (x_prev - x), g a learned per-channel sigmoid; 2 = x + lambda sigmoid(w . x[:GATE_WINDOW]) x_prev, before the norm (later records)"),
    ("BIGRAM_VOCAB_SIZE", 2048, "hashed (previous, current) token embedding buckets (0 = off)"),
    ("BIGRAM_DIM", 128, "bigram embedding width, projected to MODEL_DIM"),
    ("VE_LAYERS", "-2,-1", "value embeddings: layers (negative = from the end) whose V gets a token embedding added ('' = off)"),
    ("VE_DIM", 128, "value-embedding table width, projected to the KV width"),
    ("SKIP_GATES", 0, "gate each U-Net skip: x <- lerp(w * skip, x, sigmoid(g)), so a layer can learn how much skip it takes"),
    ("PARALLEL_FROM", -1, "blocks from this index on are parallel: x + a*Attn(n(x)) + m*MLP(n(x)), one norm, a shorter path (-1 = off)"),
    ("PARALLEL_LANES", 0, "1: blocks from PARALLEL_FROM on, in the U-Net's second half, run two lanes (attention reads lane 0, MLP lane 1, learned mix into both); the output is their mean"),
    ("LOOP_LAYERS", "", "depth recurrence: contiguous blocks (e.g. 4,5) run LOOP_REPEATS more times with the same weights ('' = off)"),
    ("LOOP_REPEATS", 2, "extra passes through LOOP_LAYERS: more depth for no extra bytes"),
    ("LOOP_START", "0.5,0.65", "fraction of the training budget at which each extra pass switches on (one value: all at once)"),
    ("ATTN_GATE", 0, "gate each head's output by sigmoid(ATTN_GATE_SCALE * w_h . x[:GATE_WINDOW]) before the output projection (zero init: 0.5)"),
    ("GATE_WINDOW", 12, "ATTN_GATE and SMEAR_GATE=2: how many leading input channels a gate reads"),
    ("ATTN_GATE_SCALE", 0.5, "attention gate: scale of the gate's logit (softer gate below 1)"),
    ("DOC_MASK", 0, "attention (and the bigram hash) never cross a BOS: each document sees only itself, in training and evaluation"),
    # data and schedule
    ("TRAIN_SEQ_LEN", 2048, "training sequence length"),
    ("TRAIN_BATCH_TOKENS", 786432, "global tokens per optimizer step, independent of world size"),
    ("LOADER", "stream", "training batches: stream = the shards in order; shuffle = sequences at random offsets, each read once per epoch (the 1.0835 record's)"),
    ("MICRO_BATCHES", 8, "micro-batches per step over all ranks (each rank runs MICRO_BATCHES / world size)"),
    ("ITERATIONS", 20000, "maximum optimizer steps"),
    ("WARMUP_STEPS", 20, "steps run then undone before training: compiles and warms kernels"),
    ("WARMDOWN_ITERS", 3500, "linear LR decay over the last N steps (measured in wall-clock when capped)"),
    ("WARMDOWN_FRAC", 0.0, "instead, decay over this fraction of the budget (time when capped, else ITERATIONS): later records' form (0 = use WARMDOWN_ITERS)"),
    ("MIN_LR", 0.0, "LR multiplier floor during warmdown: keeps the last steps learning"),
    ("MAX_WALLCLOCK_SECONDS", LIMIT_SECONDS, "training time cap (0 = none)"),
    ("VAL_LOSS_EVERY", 0, "evaluate every N steps during training (0 = only at the end)"),
    ("TRAIN_LOG_EVERY", 200, "log the training loss every N steps"),
    # optimizer
    ("MATRIX_LR", 0.025, "Muon learning rate for block matrices"),
    ("EMBED_LR", 0.035, "AdamW learning rate for embedding tables"),
    ("SCALAR_LR", 0.025, "AdamW learning rate for vectors and scalars"),
    ("MUON_MOMENTUM", 0.99, "Muon momentum after warm-up"),
    ("MUON_MOMENTUM_WARMUP_START", 0.92, "Muon momentum at step 0"),
    ("MUON_MOMENTUM_WARMUP_STEPS", 1500, "steps to ramp Muon momentum"),
    ("MUON_BACKEND_STEPS", 5, "Newton-Schulz iterations"),
    ("MUON_NS", "quintic", "Newton-Schulz coefficients: quintic (one fixed triple) or polar (Polar Express, one triple per iteration: closer to orthogonal)"),
    ("MUON_BATCHED", 0, "1: Newton-Schulz on each rank's same-shape matrices in one batched call (fewer, larger kernels); 0: one call per matrix"),
    ("MUON_ROW_NORM", 0, "MuonEq-R: normalize each row of the update before Newton-Schulz, so no row dominates the orthogonalization"),
    ("MUON_WD", 0.04, "decoupled weight decay on Muon matrices: smaller weights, finer int6 grid"),
    ("ADAM_WD", 0.04, "decoupled weight decay on AdamW vectors and scalars"),
    ("EMBED_WD", 0.04, "decoupled weight decay on the embedding tables (AdamW)"),
    ("BETA1", 0.9, "AdamW beta1"),
    ("BETA2", 0.95, "AdamW beta2"),
    ("ADAM_EPS", 1e-8, "AdamW epsilon"),
    ("GRAD_CLIP_NORM", 0.3, "clip the global gradient norm (0 = off)"),
    ("EMA_DECAY", 0.997, "exponential moving average of the weights, evaluated and exported (0 = off)"),
    # quantization and artifact
    ("QAT_THRESHOLD", 0.0, "late QAT (helps rtn without EMA): fake-quantize once the LR multiplier drops below this (0 = never, 1 = always)"),
    ("QUANT_METHOD", "gptq", "gptq: round column by column, pushing each error onto later columns through the input Hessian; rtn: round to nearest"),
    ("QUANT_SCALE", "search", "per-row scales: search (QUANT_CLIPS candidates, least error wins) or sdclip (SDCLIP_K * row std)"),
    ("QUANT_CLIPS", "1.0,0.98,0.96,0.93,0.9", "per-row clip candidates (fractions of the row max); least error (H-weighted under gptq) wins"),
    ("SDCLIP_K", 12.85, "sdclip: int5/int6 scale = k * std(row) / qmax; larger k, fewer levels, smaller artifact"),
    ("SDCLIP_K_EMBED", 20.0, "sdclip: the same k for the embedding tables"),
    ("SDCLIP_K_MLP", 0.0, "sdclip: k for the MLP matrices (0 = SDCLIP_K): a looser clip keeps their outliers"),
    ("SDCLIP_K_ATTN", 0.0, "sdclip: k for the attention matrices (0 = SDCLIP_K)"),
    ("SDCLIP_LAMBDA", 0.0, "sdclip under gptq: row clip x (1 + lambda (r - 1)), r = the row's abs(w) . diag H over its mean: wider clips for rows that feed on busy inputs"),
    ("GPTQ_CALIB_BATCHES", 16, "gptq: training batches run through the exported weights to collect each matrix's input Hessian"),
    ("GPTQ_RESERVE_SECONDS", 4.0, "gptq: end training this much before MAX_WALLCLOCK_SECONDS so calibration fits the cap"),
    ("GPTQ_DAMP", 0.01, "gptq: add this fraction of mean(diag H) to diag H: keeps the Cholesky stable"),
    ("QUANT_MIN_NUMEL", 65536, "matrices with at most this many values stay fp16"),
    ("EMBED_BITS", 8, "bits of the tied embedding's rows (6-8; 16 = fp16): it is also the output layer, the costliest to round"),
    ("SMALL_BITS", 16, "matrices under QUANT_MIN_NUMEL (skip weights, gates): 8 = int8 rows (half the bytes), 16 = fp16"),
    ("LQER_RANK", 0, "LQER: add a rank-N correction of the quantization error to the LQER_TOP worst matrices (0 = off)"),
    ("LQER_TOP", 3, "LQER: how many matrices, by output error tr(E H E^T), get a correction"),
    ("LQER_BITS", 4, "LQER: bits of the correction's factors (asymmetric, per row, 2-7)"),
    ("LQER_GROUP", 0, "LQER: one scale and zero per N consecutive values of each factor instead of per row (fewer scale bytes; 0 = per row)"),
    ("SIZE_LIMIT_BYTES", LIMIT_BYTES, "cap on code + artifact bytes; the exporter shrinks the artifact to fit"),
    # evaluation
    ("VAL_MAX_TOKENS", 0, "evaluate on this many validation tokens (0 = whole split)"),
    ("EVAL_SEQ_LEN", 0, "evaluation window length (0 = TRAIN_SEQ_LEN)"),
    ("EVAL_STRIDE", 64, "sliding-window stride for the final score (0 = skip the sliding pass)"),
    ("EVAL_BATCH_SEQS", 32, "windows per evaluation forward pass"),
    ("TTT", "off", "legal test-time training after the round trip: chunk = score each chunk of the stream, then train on it; doc = per-document LoRA (off = none)"),
    ("TTT_CHUNK_TOKENS", 32768, "chunk: tokens scored with the same weights before the model trains on them"),
    ("TTT_LR", 0.002, "chunk (and doc's phases): SGD learning rate, cosine-decayed over the chunks (phases)"),
    ("TTT_EPOCHS", 3, "chunk (and doc's phases): SGD steps per scored chunk (phase), each on its whole mean loss"),
    ("TTT_MOMENTUM", 0.9, "chunk (and doc's phases): SGD momentum, carried across chunks (fresh for each phase)"),
    ("TTT_GRAD_CLIP", 0.0, "chunk (and doc's phases): clip the SGD gradient's global norm (0 = off)"),
    ("TTT_DOC_CHUNK", 48, "doc: a document's targets scored per step, each step followed by one AdamW step on its adapter"),
    ("TTT_LORA_RANK", 96, "doc: rank of the adapter added to every linear layer (not the tied embedding), fresh for each document"),
    ("TTT_LORA_LR", 0.001, "doc: AdamW learning rate of the adapters"),
    ("TTT_LORA_BETAS", "0.9,0.999", "doc: the adapters' AdamW betas (beta1 0: no momentum within a document)"),
    ("TTT_LORA_WD", 0.0, "doc: the adapters' AdamW weight decay: pulls them back towards the base model"),
    ("TTT_LORA_SCALE", 1.0, "doc: adapter output multiplier (LoRA's alpha / rank): a larger step for B at the same LR"),
    ("TTT_LORA_HEAD", 0, "doc: 1 = an adapter on the tied output layer too (the logits), not only on the linear layers"),
    ("TTT_DOC_BATCH", 32, "doc: documents adapted side by side, one adapter each"),
    ("TTT_DOC_PHASES", 0, "doc: after each of N phases of the first TTT_PREFIX_DOCS documents, SGD on every document scored so far (0 = never)"),
    ("TTT_PREFIX_DOCS", 2500, "doc: documents (stream order) scored in the TTT_DOC_PHASES phases; the rest is scored with the final weights"),
]
# Keys that define the architecture: stored in the artifact, so EVAL_ONLY needs none of them.
ARCH_KEYS = ["VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "LOGIT_SOFTCAP", "QK_GAIN_INIT",
             "ROPE_BASE", "ROPE_DIMS", "XSA_LAST_N", "LN_SCALE", "SMEAR_GATE", "BIGRAM_VOCAB_SIZE", "BIGRAM_DIM",
             "VE_LAYERS", "VE_DIM", "TRAIN_SEQ_LEN", "MLP_ACT", "SKIP_GATES", "PARALLEL_FROM", "PARALLEL_LANES", "LOOP_LAYERS", "LOOP_REPEATS",
             "DOC_MASK", "ATTN_GATE", "GATE_WINDOW", "ATTN_GATE_SCALE"]
PRESETS = {  # PRESET=name supplies defaults; explicit variables still win
    "record": {},
    "baseline": dict(NUM_LAYERS=9, MLP_MULT=2, TRAIN_SEQ_LEN=1024, TRAIN_BATCH_TOKENS=524288, ROPE_DIMS=0, XSA_LAST_N=0,
                     LN_SCALE=0, SMEAR_GATE=0, BIGRAM_VOCAB_SIZE=0, VE_LAYERS="", MATRIX_LR=0.04, EMBED_LR=0.05,
                     SCALAR_LR=0.04, MUON_MOMENTUM=0.95, MUON_MOMENTUM_WARMUP_START=0.85, MUON_MOMENTUM_WARMUP_STEPS=500,
                     MUON_WD=0.0, ADAM_WD=0.0, EMBED_WD=0.0, GRAD_CLIP_NORM=0.0, EMA_DECAY=0.0, QUANT_METHOD="rtn", QUANT_CLIPS="1.0",
                     WARMDOWN_ITERS=1200, EVAL_STRIDE=0, ROPE_BASE=10000.0),
    # the best published run without test-time training (1.0835, 2026-04-06), on the sp8192 data
    "frontier": dict(DATA_PATH="./data/datasets/fineweb10B_sp8192", TOKENIZER_PATH="./data/tokenizers/fineweb_8192_bpe.model",
                     MLP_MULT=4, MLP_ACT="leaky2", ROPE_BASE=10000.0, XSA_LAST_N=11, SMEAR_GATE=0, BIGRAM_VOCAB_SIZE=0,
                     VE_LAYERS="", SKIP_GATES=1, PARALLEL_FROM=7, LOOP_LAYERS="4,5", LOOP_REPEATS=2, LOOP_START="0.5,0.65",
                     QK_GAIN_INIT=4.0, MUON_ROW_NORM=1, MUON_WD=0.085, EMBED_WD=0.085, ADAM_WD=0.02, MATRIX_LR=0.02,
                     SCALAR_LR=0.02, EMBED_LR=0.03, WARMDOWN_FRAC=0.667, QUANT_SCALE="sdclip", SDCLIP_LAMBDA=0.175,
                     LOADER="shuffle", GPTQ_CALIB_BATCHES=8, GPTQ_RESERVE_SECONDS=12.0),
    # the best run in the public records folder (1.0611, 2026-04-27): CaseOps data, test-time training
    "top": dict(DATA_PATH="./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                TOKENIZER_PATH="./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
                MLP_MULT=4, MLP_ACT="leaky2", ROPE_BASE=10000.0, XSA_LAST_N=11, SMEAR_GATE=2, BIGRAM_VOCAB_SIZE=0, VE_LAYERS="",
                SKIP_GATES=1, PARALLEL_FROM=8, PARALLEL_LANES=1, LOOP_LAYERS="3,4,5", LOOP_REPEATS=2, LOOP_START="0.35",
                QK_GAIN_INIT=5.0, ATTN_GATE=1, DOC_MASK=1, FUSED_CE=1, MUON_ROW_NORM=1, MUON_NS="polar", MUON_MOMENTUM=0.97,
                MUON_WD=0.095, EMBED_WD=0.085, ADAM_WD=0.02, MATRIX_LR=0.026, SCALAR_LR=0.02, EMBED_LR=0.03, BETA2=0.99,
                WARMDOWN_FRAC=0.85, MIN_LR=0.1, EMA_DECAY=0.9965, QUANT_SCALE="sdclip", SDCLIP_K_MLP=11.5, SDCLIP_K_ATTN=13.0,
                SDCLIP_K_EMBED=14.0, EMBED_BITS=7, SMALL_BITS=8, LQER_RANK=4, LQER_GROUP=64, GPTQ_CALIB_BATCHES=2,
                GPTQ_RESERVE_SECONDS=0.5, TTT="doc", TTT_DOC_BATCH=64, TTT_LORA_RANK=80, TTT_LORA_LR=0.0001,
                TTT_LORA_BETAS="0,0.99", TTT_LORA_WD=0.5, TTT_LORA_SCALE=1.8, TTT_LORA_HEAD=1, TTT_DOC_PHASES=3,
                TTT_LR=0.001, TTT_EPOCHS=1, TTT_GRAD_CLIP=1.0),
}
SMOKE = dict(  # SMOKE=1: tiny CPU-sized run on the embedded sample (data/build_sample.py), seconds end to end
    DATA_PATH="./data/datasets/stdlib_sp1024", TOKENIZER_PATH="./data/tokenizers/stdlib_1024_bpe.model",
    NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=4096,
    MICRO_BATCHES=2, ITERATIONS=40, WARMUP_STEPS=2, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0.0, TRAIN_LOG_EVERY=10,
    MUON_MOMENTUM_WARMUP_STEPS=20, EMA_DECAY=0.9, QUANT_MIN_NUMEL=4096, VAL_MAX_TOKENS=32768, BIGRAM_VOCAB_SIZE=512,
    BIGRAM_DIM=32, VE_DIM=32, EVAL_STRIDE=32, GPTQ_CALIB_BATCHES=4,
)
SMOKE_PRESET = {"frontier": dict(XSA_LAST_N=4, PARALLEL_FROM=3, LOOP_LAYERS="1,2", LOOP_START="0.3,0.6", BIGRAM_VOCAB_SIZE=0),
                "top": dict(XSA_LAST_N=4, PARALLEL_FROM=3, LOOP_LAYERS="1,2", LOOP_START="0.3", GATE_WINDOW=8,
                            TTT_DOC_BATCH=8, TTT_LORA_RANK=8, TTT_PREFIX_DOCS=6, TTT_CHUNK_TOKENS=1024, BIGRAM_VOCAB_SIZE=0)}
CHOICES = {"MLP_ACT": ("relu2", "leaky2"), "MUON_NS": ("quintic", "polar"), "QUANT_METHOD": ("rtn", "gptq"),
           "QUANT_SCALE": ("search", "sdclip"), "AUTOCAST": ("auto", "bf16", "off"), "TTT": ("off", "chunk", "doc"),
           "LOADER": ("stream", "shuffle"), "TTT_LORA_HEAD": (0, 1),
           "COMPILE": (-1, 0, 1), "ATTN": ("auto", "fa3", "flex", "sdpa"),
           **{k: (0, 1) for k in ("EVAL_ONLY", "LN_SCALE", "SKIP_GATES", "FUSED_CE", "DOC_MASK", "ATTN_GATE", "PARALLEL_LANES",
                                  "MUON_ROW_NORM", "MUON_BATCHED")}, "EMBED_BITS": (6, 7, 8, 16), "SMEAR_GATE": (0, 1, 2),
           "SMALL_BITS": (8, 16)}
POSITIVE = ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "TRAIN_SEQ_LEN", "EVAL_BATCH_SEQS",
            "ITERATIONS", "SDCLIP_K", "SDCLIP_K_EMBED", "GPTQ_CALIB_BATCHES", "GPTQ_DAMP", "TTT_CHUNK_TOKENS", "TTT_LR",
            "TTT_EPOCHS", "TTT_DOC_CHUNK", "TTT_LORA_RANK", "TTT_LORA_LR", "TTT_DOC_BATCH", "TTT_PREFIX_DOCS", "TTT_LORA_SCALE")


def parse_hparams(env=None) -> dict:
    """Settings from the environment: explicit variable > SMOKE > PRESET > default (types checked, nothing else)."""
    env = os.environ if env is None else env
    preset = env.get("PRESET", "record")
    if preset not in PRESETS:
        raise UserError(f"PRESET={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    defaults = {k: d for k, d, _ in HPARAMS} | PRESETS[preset]
    smoke = env.get("SMOKE", "0")
    if smoke not in ("0", "1", ""):
        raise UserError(f"SMOKE={smoke!r} must be 0 or 1")
    if smoke == "1":
        defaults |= SMOKE | SMOKE_PRESET.get(preset, {})
    hp = {"PRESET": preset, "SMOKE": int(smoke == "1")}
    for name, default, _ in HPARAMS:
        raw, d = env.get(name), defaults[name]
        if raw is None or raw == "" and not isinstance(d, str):
            hp[name] = d
            continue
        try:
            hp[name] = type(d)(raw) if not isinstance(d, int) else int(raw)
        except ValueError:
            raise UserError(f"{name}={raw!r} is not a valid {type(d).__name__}") from None
        if isinstance(d, float) and not math.isfinite(hp[name]):
            raise UserError(f"{name}={raw!r} must be finite")
    return hp


def num_list(hp, key: str, kind=int, what: str = "numbers") -> list:
    """A comma-separated setting as a list ('' = empty)."""
    raw = str(hp[key]).replace(" ", "")
    try:
        return [kind(t) for t in raw.split(",")] if raw else []
    except ValueError:
        raise UserError(f"{key}={hp[key]!r} must be comma-separated {what}") from None


def ve_layers(arch) -> list[int]:
    n, layers = arch["NUM_LAYERS"], num_list(arch, "VE_LAYERS", what="layer indices")
    if not all(-n <= i < n for i in layers):
        raise UserError(f"VE_LAYERS={arch['VE_LAYERS']!r} names a layer that does not exist with NUM_LAYERS={n}")
    return sorted({i % n for i in layers})


def loop_layers(arch) -> list[int]:
    """Depth recurrence: the contiguous block indices that run LOOP_REPEATS extra times ([] = off)."""
    layers, n, raw = num_list(arch, "LOOP_LAYERS", what="block indices, e.g. 4,5"), arch["NUM_LAYERS"], arch["LOOP_LAYERS"]
    if layers and (layers != list(range(layers[0], layers[-1] + 1)) or not 0 <= layers[0] <= layers[-1] < n):
        raise UserError(f"LOOP_LAYERS={raw!r} must be contiguous increasing block indices in 0..{n - 1}, e.g. 4,5")
    if layers and arch["LOOP_REPEATS"] < 1:
        raise UserError(f"LOOP_REPEATS={arch['LOOP_REPEATS']} must be at least 1 when LOOP_LAYERS is set")
    return layers


def loop_starts(hp) -> list[float]:
    """Budget fraction at which each extra pass through LOOP_LAYERS switches on."""
    if not loop_layers(hp):
        return []
    R, starts = hp["LOOP_REPEATS"], num_list(hp, "LOOP_START", float, "fractions")
    starts = starts * R if len(starts) == 1 else starts
    if len(starts) != R or not all(0 <= a <= b <= 1 for a, b in zip([0.0] + starts, starts)):
        raise UserError(f"LOOP_START={hp['LOOP_START']!r} needs one or LOOP_REPEATS={R} non-decreasing fractions in [0, 1]")
    return starts


def clips(hp) -> list[float]:
    c = num_list(hp, "QUANT_CLIPS", float)
    if not c or not all(0 < x <= 1 for x in c):
        raise UserError(f"QUANT_CLIPS={hp['QUANT_CLIPS']!r}: each clip must be in (0, 1]")
    return c


def checkpoint_every(hp) -> tuple[int, float]:
    """CHECKPOINT_EVERY as (steps, seconds), one of them 0."""
    s = str(hp["CHECKPOINT_EVERY"]).strip()
    try:
        n = float(s[:-1]) if s.endswith("s") else int(s)
    except ValueError:
        n = -1
    if not 0 <= n < math.inf:
        raise UserError(f"CHECKPOINT_EVERY={s!r} must be a step count (500), seconds (600s) or 0")
    return (0, n) if s.endswith("s") else (n, 0.0)


def check_hparams(hp: dict, world: int) -> None:
    def need(cond, msg):
        if not cond:
            raise UserError(msg)
    for k in POSITIVE:
        need(hp[k] > 0, f"{k}={hp[k]} must be positive")
    for k, opts in CHOICES.items():
        need(hp[k] in opts, f"{k}={hp[k]!r} must be {', '.join(map(str, opts[:-1]))} or {opts[-1]}")
    need(hp["VOCAB_SIZE"] <= 65536, f"VOCAB_SIZE={hp['VOCAB_SIZE']} does not fit the uint16 shards")
    need(hp["MODEL_DIM"] % hp["NUM_HEADS"] == 0, f"MODEL_DIM={hp['MODEL_DIM']} is not divisible by NUM_HEADS={hp['NUM_HEADS']}")
    need(hp["NUM_HEADS"] % hp["NUM_KV_HEADS"] == 0, f"NUM_HEADS={hp['NUM_HEADS']} is not divisible by NUM_KV_HEADS={hp['NUM_KV_HEADS']}")
    hd = hp["MODEL_DIM"] // hp["NUM_HEADS"]
    need(hd % 2 == 0 and 0 <= hp["ROPE_DIMS"] <= hd and hp["ROPE_DIMS"] % 2 == 0, f"ROPE_DIMS={hp['ROPE_DIMS']} must be even and at most the head dim {hd}")
    need(0 <= hp["XSA_LAST_N"] <= hp["NUM_LAYERS"], f"XSA_LAST_N={hp['XSA_LAST_N']} must be in 0..NUM_LAYERS")
    ve_layers(hp), loop_layers(hp), clips(hp), checkpoint_every(hp)
    need(0 < hp["GATE_WINDOW"] <= hp["MODEL_DIM"], f"GATE_WINDOW={hp['GATE_WINDOW']} must be in 1..MODEL_DIM")
    need(-1 <= hp["PARALLEL_FROM"] < hp["NUM_LAYERS"], f"PARALLEL_FROM={hp['PARALLEL_FROM']} must be -1 (off) or a layer in 0..NUM_LAYERS-1")
    need(not hp["PARALLEL_LANES"] or hp["PARALLEL_FROM"] > max(loop_layers(hp), default=-1),
         "PARALLEL_LANES=1 needs PARALLEL_FROM set past the last of LOOP_LAYERS: once the lanes start, every later block runs them")
    need(0 <= hp["WARMDOWN_FRAC"] <= 1 and 0 <= hp["MIN_LR"] < 1, "WARMDOWN_FRAC must be in [0, 1] and MIN_LR in [0, 1)")
    for k in ("EMA_DECAY", "TTT_MOMENTUM"):
        need(0 <= hp[k] < 1, f"{k}={hp[k]} must be in [0, 1)")
    need(0 <= hp["QAT_THRESHOLD"] <= 1, f"QAT_THRESHOLD={hp['QAT_THRESHOLD']} must be in [0, 1]")
    need(hp["GPTQ_RESERVE_SECONDS"] >= 0, "GPTQ_RESERVE_SECONDS must be non-negative")
    need(0 <= hp["SDCLIP_LAMBDA"] <= 1, f"SDCLIP_LAMBDA={hp['SDCLIP_LAMBDA']} must be in [0, 1]")
    need(not hp["LQER_RANK"] or hp["QUANT_METHOD"] == "gptq", "LQER_RANK needs QUANT_METHOD=gptq: it weighs errors by the GPTQ Hessians")
    need(hp["LQER_RANK"] >= 0 and hp["LQER_TOP"] >= 0 and 2 <= hp["LQER_BITS"] <= 7 and hp["LQER_GROUP"] >= 0,
         "LQER_RANK, LQER_TOP and LQER_GROUP must be non-negative and LQER_BITS in 2..7")
    need(hp["SDCLIP_K_MLP"] >= 0 and hp["SDCLIP_K_ATTN"] >= 0, "SDCLIP_K_MLP and SDCLIP_K_ATTN must be non-negative (0 = SDCLIP_K)")
    betas = num_list(hp, "TTT_LORA_BETAS", float)
    need(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"TTT_LORA_BETAS={hp['TTT_LORA_BETAS']!r} must be two numbers in [0, 1)")
    need(hp["TTT_DOC_PHASES"] >= 0 and hp["TTT_LORA_WD"] >= 0 and hp["TTT_GRAD_CLIP"] >= 0,
         "TTT_DOC_PHASES, TTT_LORA_WD and TTT_GRAD_CLIP must be non-negative")
    need(hp["TTT"] == "off" or hp["MICRO_BATCHES"] % world == 0,
         f"TTT needs MICRO_BATCHES={hp['MICRO_BATCHES']} to be a multiple of the world size {world}: its SGD sums gradients over that many slots")
    need(hp["RESUME"] != "auto" or hp["RUN_ID"], "RESUME=auto needs RUN_ID=name: it resumes LOG_DIR/RUN_ID.ckpt")
    if hp["EVAL_ONLY"]:
        need(hp["ARTIFACT"], "EVAL_ONLY=1 needs ARTIFACT=path/to/artifact.ptz")
        return
    loop_starts(hp)
    if hp["QUANT_METHOD"] == "gptq" and hp["MAX_WALLCLOCK_SECONDS"] > 0:
        r, cap = hp["GPTQ_RESERVE_SECONDS"], hp["MAX_WALLCLOCK_SECONDS"]
        need(0 < r < cap, f"GPTQ_RESERVE_SECONDS={r} must be in (0, MAX_WALLCLOCK_SECONDS={cap}): calibration reads training data, inside the cap")
    L, mb = hp["TRAIN_SEQ_LEN"], hp["MICRO_BATCHES"]
    need(mb > 0 and mb % world == 0, f"MICRO_BATCHES={mb} must be a positive multiple of the world size {world}")
    need(hp["TRAIN_BATCH_TOKENS"] % (mb * L) == 0,
         f"TRAIN_BATCH_TOKENS={hp['TRAIN_BATCH_TOKENS']} is not divisible by MICRO_BATCHES {mb} x TRAIN_SEQ_LEN {L}")
    need(hp["WARMUP_STEPS"] >= 0 and hp["WARMDOWN_ITERS"] >= 0, "WARMUP_STEPS and WARMDOWN_ITERS must be non-negative")


def load_tokenizer(path: str):
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise UserError(f"tokenizer not found: {path} (set TOKENIZER_PATH)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError):
        raise UserError(f"{path} is not a SentencePiece model") from None
    return sp


class Config(dict):
    """The settings, resolved once and read-only from then on (hp["NAME"]), with the values derived from them as
    attributes: eval_len (evaluation window), loop_starts, clips (QUANT_CLIPS), checkpoint_every (steps, seconds),
    arch (the ARCH_KEYS, which rebuild the model)."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.eval_len = self["EVAL_SEQ_LEN"] or self["TRAIN_SEQ_LEN"]
        self.loop_starts = [] if self["EVAL_ONLY"] else loop_starts(self)  # a training schedule: not in artifacts
        self.clips, self.checkpoint_every = clips(self), checkpoint_every(self)
        self.arch = {k: self[k] for k in ARCH_KEYS}  # set last: from here on nothing can be set

    def _read_only(self, *_, **__):
        raise TypeError("the configuration is read-only once resolved; build another: Config(dict(hp) | changes)")

    def __setattr__(self, name, value):
        if "arch" in self.__dict__:
            self._read_only()
        super().__setattr__(name, value)

    def __reduce__(self):  # copy and pickle rebuild it from its settings
        return Config, (dict(self),)

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _read_only


def resolve_config(env=None, world: int = 1, stored_arch: dict | None = None) -> Config:
    """The run's configuration, before anything runs: parse_hparams, then VOCAB_SIZE from the tokenizer unless it is
    set (a missing tokenizer is reported where it is read), or under EVAL_ONLY the artifact's own architecture
    (`stored_arch`), then every check."""
    hp = parse_hparams(env)
    env = os.environ if env is None else env
    if stored_arch is not None:
        hp |= {k: stored_arch[k] for k in ARCH_KEYS}
    elif env.get("VOCAB_SIZE", "") == "" and os.path.isfile(hp["TOKENIZER_PATH"]):
        hp["VOCAB_SIZE"] = load_tokenizer(hp["TOKENIZER_PATH"]).vocab_size()
    check_hparams(hp, world)
    return Config(hp)



# ----------------------------------------------------------------------------- run context
# Ranks, device, autocast, compile and the log in one Context (instead of rank/world threaded through every call).
class Logger:
    """Rank 0 writes every line to stdout and to the run's log file; other ranks stay silent."""

    def __init__(self, rank):
        self.rank, self.file = rank, None

    def open(self, path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.file = open(path, "a", encoding="utf-8", newline="")

    def __call__(self, msg: str, console: bool = True):
        if self.rank != 0:
            return
        if console:
            from tqdm import tqdm
            tqdm.write(msg)
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()


@dataclasses.dataclass
class Context:
    """Where and how this process runs: rank of world, device, autocast dtype (None = fp32), whether models are
    compiled, and the log (written by rank 0)."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    amp: torch.dtype | None = None
    compile: bool = False
    log: Logger = dataclasses.field(default_factory=lambda: Logger(0))
    attn: str = "sdpa"  # the attention kernel (attn_backend)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def progress(self, total, desc):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=self.rank != 0 or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)

    def on_rank0(self, fn):
        """Run fn on rank 0 only; if it fails, every rank raises, so no rank waits forever at the next collective."""
        err, out = None, None
        if self.rank == 0:
            try:
                out = fn()
            except (UserError, OSError) as e:
                err = e if isinstance(e, UserError) else UserError(f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}")
        if self.world > 1:
            flag = torch.tensor([float(err is not None)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag)
            if flag.item() and err is None:
                err = UserError("rank 0 failed (see its message)")
        if err is not None:
            raise err
        return out


def attn_backend(choice: str, device) -> str:
    """ATTN resolved for this device: auto = fa3 if installed, else flex, on CUDA; sdpa on the CPU."""
    if choice == "auto":
        return ("fa3" if _fa3 is not None else "flex" if flex_attention is not None else "sdpa") if device.type == "cuda" else "sdpa"
    if choice == "fa3" and (_fa3 is None or device.type != "cuda"):
        raise UserError("ATTN=fa3 needs CUDA and the flash_attn_interface package (FlashAttention 3); use ATTN=auto")
    if choice == "flex" and (flex_attention is None or device.type != "cuda"):
        raise UserError("ATTN=flex needs CUDA (FlexAttention has no backward pass on the CPU) and torch >= 2.5; use ATTN=auto")
    return choice


def amp_dtype(hp, device) -> torch.dtype | None:
    """AUTOCAST as the mixed-precision dtype (None = fp32)."""
    return torch.bfloat16 if hp["AUTOCAST"] == "bf16" or hp["AUTOCAST"] == "auto" and device.type == "cuda" else None


def start_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group under torchrun (NCCL on GPUs, gloo on CPU)."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if distributed and not dist.is_initialized():
        # 30 min: the other ranks wait at a collective while rank 0 runs the budget fit (minutes of zstd-22)
        timeout, store = datetime.timedelta(minutes=30), None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store outlives a restart: new keys
            store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout=timeout))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout, store=store, rank=rank,
                                world_size=world)
    return rank, world, device


def write_atomic(path: str, blob: bytes, what: str) -> None:
    """Temporary name, fsync, rename: `path` holds the previous file or the whole new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"cannot write {what} {path}: {e.strerror}") from None


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None


# ----------------------------------------------------------------------------- data
# Challenge shards (header + uint16 tokens), the training stream split across ranks, the validation split and the
# per-token byte counts that turn nats into val_bpb.
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256  # challenge shard header: 256 little-endian int32
BOS_ID = 1  # every document in the shards starts with this token


def read_shard_header(path: str) -> int:
    """Validate a shard's header and size; return its token count."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    except OSError as e:
        raise UserError(f"cannot read shard {path}: {e.strerror}") from None
    if header.size < SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise UserError(f"corrupt shard {path}: bad header (expected magic {SHARD_MAGIC}, version {SHARD_VERSION}); re-download or rebuild it")
    n = int(header[2])
    if n < 0 or size != 4 * SHARD_HEADER_INTS + 2 * n:
        raise UserError(f"corrupt shard {path}: header says {n} tokens ({4 * SHARD_HEADER_INTS + 2 * n} bytes) but the file has {size} bytes; re-download or rebuild it")
    return n


def load_data_shard(path: str) -> np.ndarray:
    """All tokens of one shard as a uint16 array, after full header/size validation."""
    n = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=n, offset=4 * SHARD_HEADER_INTS)


def shard_files(hp, split: str) -> list[str]:
    pattern = os.path.join(hp["DATA_PATH"], f"*_{split}_*.bin")
    files = sorted(f for f in glob.glob(pattern) if "_val_bytes_" not in os.path.basename(f))  # not the byte sidecar
    if not files:
        folder = os.path.basename(os.path.normpath(hp["DATA_PATH"]))
        variant = folder[len("fineweb10B_"):] if folder.startswith("fineweb10B_") else "sp1024"
        hint = " (build it: python data/build_sample.py)" if hp["SMOKE"] else f" (download it: python data/cached_challenge_fineweb.py --variant {variant})"
        raise UserError(f"no {split} shards: {pattern} matched nothing{hint}")
    return files


class TokenStream:
    """The training shards as one endless stream of tokens, read in order and wrapped around."""

    def __init__(self, files: list[str]):
        self.files, self.idx, self.pos = files, 0, 0
        self.tokens = load_data_shard(files[0])

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.idx = (self.idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.idx]), 0
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Each step takes the next TRAIN_BATCH_TOKENS (+1) tokens of the stream as B sequences of length L;
    rank r keeps sequences [r*B/W, (r+1)*B/W), so the global batch is the same for any world size."""

    def __init__(self, files, rank, world, device):
        self.stream, self.rank, self.world, self.device = TokenStream(files), rank, world, device

    def next_batch(self, batch_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        chunk = self.stream.take(batch_tokens + 1)
        self.stream.pos -= 1  # the extra target token is also the next step's first input (take() leaves pos >= 1)
        per_rank = batch_tokens // self.world
        span = torch.from_numpy(chunk[self.rank * per_rank: (self.rank + 1) * per_rank + 1].astype(np.int64))
        span = span.to(self.device, non_blocking=True)
        return span[:-1].view(-1, seq_len), span[1:].view(-1, seq_len)

    def state(self) -> list[int]:
        return [self.stream.idx, self.stream.pos]

    def restore(self, state: list[int]) -> None:
        s = self.stream
        s.idx, s.pos = state
        s.tokens = load_data_shard(s.files[s.idx])


class ShuffleLoader:
    """LOADER=shuffle: each epoch every shard gets a random phase in [0, L) and is cut into sequences of L (+1) tokens
    from there; all sequences of all shards are dealt in one random order (from SEED and the epoch), B/L per step,
    rank r reading slice r of each step's sequences, so the global batch is the same for any world size."""

    def __init__(self, files, rank, world, device, seed: int, seq_len: int):
        self.files, self.rank, self.world, self.device, self.seed, self.L = files, rank, world, device, seed, seq_len
        self.sizes = [read_shard_header(f) for f in files]
        self.maps = [np.memmap(f, dtype="<u2", mode="r", offset=4 * SHARD_HEADER_INTS, shape=(n,)) for f, n in zip(files, self.sizes)]
        self.restore([0, 0])

    def _deal(self) -> None:
        rng, L = np.random.default_rng([self.seed, self.epoch]), self.L
        phase = [int(rng.integers(min(L, max(1, n - L)))) for n in self.sizes]
        counts = [max(0, (n - 1 - p) // L) for n, p in zip(self.sizes, phase)]
        if not sum(counts):
            raise UserError(f"the training shards hold no sequence of TRAIN_SEQ_LEN={L} + 1 tokens")
        shard = np.repeat(np.arange(len(counts)), counts)
        start = np.concatenate([p + L * np.arange(c) for p, c in zip(phase, counts)])
        order = rng.permutation(len(shard))
        self.order = shard[order], start[order]

    def next_batch(self, batch_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        n, picks = batch_tokens // seq_len, []
        while n > 0:
            if self.cursor == len(self.order[0]):
                self.restore([self.epoch + 1, 0])
            k = min(n, len(self.order[0]) - self.cursor)
            picks += list(zip(*(a[self.cursor:self.cursor + k] for a in self.order)))
            self.cursor, n = self.cursor + k, n - k
        per = len(picks) // self.world
        rows = [self.maps[i][j:j + seq_len + 1] for i, j in picks[self.rank * per:(self.rank + 1) * per]]
        span = torch.from_numpy(np.stack(rows).astype(np.int64)).to(self.device, non_blocking=True)
        return span[:, :-1], span[:, 1:]

    def state(self) -> list[int]:
        return [self.epoch, self.cursor]

    def restore(self, state: list[int]) -> None:
        self.epoch, self.cursor = state
        self._deal()


def make_loader(hp, files: list[str], ctx):
    """The training batches LOADER names; a fresh one starts at the beginning."""
    if hp["LOADER"] == "shuffle":
        return ShuffleLoader(files, ctx.rank, ctx.world, ctx.device, hp["SEED"], hp["TRAIN_SEQ_LEN"])
    return DistributedTokenLoader(files, ctx.rank, ctx.world, ctx.device)


def byte_luts(hp, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token byte counts for val_bpb, exactly as the challenge defines them:
    control/unknown/unused ids are boundaries with 0 bytes, byte pieces 1, other pieces the UTF-8 length without
    the leading '▁', plus 1 for that space unless the previous token is a boundary."""
    path = hp["TOKENIZER_PATH"]
    sp = load_tokenizer(path)
    if sp.vocab_size() != hp["VOCAB_SIZE"]:
        raise UserError(f"tokenizer {path} has vocab {sp.vocab_size()} but VOCAB_SIZE={hp['VOCAB_SIZE']}; set VOCAB_SIZE to match")
    n = sp.vocab_size()
    base, lead, bound = np.zeros(n, np.int16), np.zeros(n, np.bool_), np.zeros(n, np.bool_)
    for i in range(n):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
            bound[i] = True
        elif sp.IsByte(i):
            base[i] = 1
        else:
            piece = sp.IdToPiece(i)
            lead[i] = piece.startswith("\u2581")
            base[i] = len(piece[int(lead[i]):].encode("utf-8"))
    return tuple(torch.from_numpy(a).to(device) for a in (base, lead, bound))


@dataclasses.dataclass
class Validation:
    """The validation tokens scored (int32, on the device), their byte-count tables (byte_luts), the length of
    the whole split (for time estimates when VAL_MAX_TOKENS scores a prefix) and, when DATA_PATH has a byte sidecar
    (CaseOps data), each position's original UTF-8 bytes (int32, on the device), which replace the tables."""
    tokens: Tensor
    luts: tuple[Tensor, Tensor, Tensor]
    full_tokens: int
    sidecar: Tensor | None = None

    def bytes_at(self, pos: Tensor) -> Tensor | None:
        """The sidecar's bytes of the targets at stream positions `pos`; None: count them with the tables."""
        return None if self.sidecar is None else self.sidecar[pos]


def val_byte_sidecar(files: list[str]) -> list[str] | None:
    """The byte sidecar of the validation shards: <prefix>_val_bytes_NNNNNN.bin beside each <prefix>_val_NNNNNN.bin
    (the layout of the public CaseOps datasets: the shard header, then one uint16 per token, the original UTF-8 bytes
    it stands for), or None when there is none. Each must hold as many values as its shard has tokens."""
    found = {f for d in {os.path.dirname(f) for f in files} for f in glob.glob(os.path.join(d, "*_val_bytes_*.bin"))}
    if not found:
        return None
    pairs = [(f, "_val_bytes_".join(f.rsplit("_val_", 1))) for f in files]
    for f, b in pairs:
        if b not in found:
            raise UserError(f"validation shard {f} has no byte sidecar {b} while others have one; rebuild the data "
                            "(prepare_text.py --caseops) or download it again")
        if read_shard_header(b) != read_shard_header(f):
            raise UserError(f"byte sidecar {b} has {read_shard_header(b)} values but {f} has {read_shard_header(f)} "
                            "tokens; rebuild the data (prepare_text.py --caseops) or download it again")
    return [b for _, b in pairs]


def load_validation(hp: Config, device) -> Validation:
    """Validation tokens (a prefix if VAL_MAX_TOKENS), with their byte counts: the byte sidecar's if there is one,
    else the tokenizer's tables."""
    files = shard_files(hp, "val")
    full = sum(read_shard_header(f) for f in files)
    tokens = np.concatenate([load_data_shard(f) for f in files])
    side = val_byte_sidecar(files)
    side = None if side is None else np.concatenate([load_data_shard(f) for f in side])
    if hp["VAL_MAX_TOKENS"] > 0:
        tokens, side = tokens[: hp["VAL_MAX_TOKENS"]], None if side is None else side[: hp["VAL_MAX_TOKENS"]]
    if len(tokens) < hp.eval_len + 1:
        raise UserError(f"validation split has {len(tokens)} tokens, fewer than one sequence of {hp.eval_len} + 1; "
                        "lower EVAL_SEQ_LEN/TRAIN_SEQ_LEN or raise VAL_MAX_TOKENS")
    tokens = torch.from_numpy(tokens.astype(np.int32)).to(device)
    side = None if side is None else torch.from_numpy(side.astype(np.int32)).to(device)
    return Validation(tokens, byte_luts(hp, device), full, side)


# ----------------------------------------------------------------------------- quantization
# Symmetric per-row intN rounding with fp16 scales (amax clip search or SDClip), the one quantizer of late QAT in the
# model and of the exporter; GPTQ onto the same grid; per-tensor schemes; the order-0 entropy size estimate.
SCALE_FLOOR = 2.0 ** -14  # smallest normal fp16: keeps all-zero rows finite (an underflowing floor gives NaN)


def fp16_round(x: Tensor) -> Tensor:
    """Round positive fp32 values in fp16's normal range to fp16 precision (nearest, ties to even) with integer ops:
    torch.compile elides x.half().float() (inductor does not emulate precision casts by default), which would make
    the training-time quantizer differ from the exporter's."""
    i = x.view(torch.int32)
    return ((i + 0xFFF + ((i >> 13) & 1)) & -0x2000).view(torch.float32)


def row_scales(w: Tensor, bits: int, cands: list[float], stat: str = "amax", mult: Tensor | None = None) -> Tensor:
    """Candidate per-row scales (C, rows, 1), exactly the fp16 values that ship: c * (row max |w| or row std) / qmax,
    times a per-row factor `mult` if given (Hessian-aware SDClip)."""
    qmax = 2 ** (bits - 1) - 1
    r = w.abs().amax(dim=1, keepdim=True) if stat == "amax" else w.std(dim=1, keepdim=True)
    r = r if mult is None else r * mult.view(-1, 1)
    c = torch.tensor(cands, dtype=torch.float32, device=w.device).view(-1, 1, 1)
    return fp16_round((r * c / qmax).clamp_min(SCALE_FLOOR))


def quantize_rows(w: Tensor, bits: int, cands: list[float], stat: str = "amax") -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric per-row round-to-nearest to +-(2^(bits-1)-1) levels with an fp16 scale per row. For each row the
    candidate scale (row_scales) with the least squared reconstruction error wins; ties go to the first candidate.
    Returns (q int8, scale fp16, index of the chosen candidate). This one function is the RTN exporter and, inside
    fake_quant, the training-time quantizer."""
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    scale = row_scales(w, bits, cands, stat)
    q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    if len(cands) == 1:
        return q[0].to(torch.int8), scale[0, :, 0].half(), torch.zeros(w.size(0), dtype=torch.long, device=w.device)
    err = (q * scale - w).square().sum(dim=2)  # (C, rows)
    best = err.argmin(dim=0)
    pick = best.view(1, -1, 1)
    q = q.gather(0, pick.expand(1, *w.shape))[0]
    return q.to(torch.int8), scale.gather(0, pick)[0, :, 0].half(), best


def fake_quant(w: Tensor, bits: int, spec: tuple[str, list[float]], on: Tensor) -> Tensor:
    """w + stopgrad(Q(w) - w) when `on`, else w. `on` is a tensor, so torch.compile keeps both branches in one graph
    (no recompile when it flips, nothing folded at trace time); Q is finite everywhere, so the unused branch cannot
    leak a NaN."""
    q, s, _ = quantize_rows(w, bits, spec[1], spec[0])
    dq = q.float() * s.float()[:, None]
    return torch.where(on, w + (dq - w).detach(), w)


def quant_spec(hp: Config, name: str, table: bool) -> tuple[str, list[float]]:
    """How matrix `name` (an embedding table if `table`) gets its per-row scale candidates: ("amax", clips) = fractions
    of the row max, ("std", [k]) = SDClip, k standard deviations of the row (k by role: tables, MLP, attention)."""
    if hp["QUANT_SCALE"] == "sdclip":
        role = "EMBED" if table else "MLP" if ".mlp." in name else "ATTN" if ".attn." in name else ""
        return "std", [hp[f"SDCLIP_K_{role}"] if role and hp[f"SDCLIP_K_{role}"] else hp["SDCLIP_K"]]
    return "amax", hp.clips


def sdclip_rows(w: Tensor, H: Tensor, lam: float) -> Tensor:
    """Hessian-aware SDClip's per-row factor 1 + lam (r_i - 1), r_i = sum_j |w_ij| H_jj normalized to mean 1: rows
    that feed heavily used inputs get a wider clip (fewer clipped values), the others a finer grid."""
    r = (w.abs().float() @ H.diagonal().float().clamp_min(0)).view(-1)
    return 1 + lam * (r / r.mean().clamp_min(1e-30) - 1)


def gptq(w: Tensor, H: Tensor, bits: int, cands: list[float], stat: str = "amax", *, damp: float = 0.01,
         act_order: bool = True, block: int = 128, mult: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ: quantize w (rows x cols) column by column, pushing each column's rounding error onto the columns not yet
    quantized through the Cholesky factor of H^-1, H = sum of X^T X over the layer's inputs (damped by damp * mean
    diag H; columns in decreasing diag H order with act_order). Rows are independent given H, so every candidate
    scale of every row (row_scales) runs at once, and per row the candidate with the least output error
    (w - w_hat) H (w - w_hat)^T wins. `mult`: row_scales' per-row factor. Same return as quantize_rows; with
    H = identity it gives quantize_rows' symbols exactly."""
    qmax, (rows, cols) = 2 ** (bits - 1) - 1, w.shape
    w = w.detach().float()
    scale = row_scales(w, bits, cands, stat, mult)
    C = scale.size(0)
    S = scale.reshape(C * rows, 1)
    Hd = H.detach().double().clone()
    dead = Hd.diagonal() == 0  # inputs never seen in calibration: a unit diagonal rounds them to nearest, alone
    Hd[dead, dead] = 1.0
    W = w.repeat(C, 1)
    perm = torch.argsort(Hd.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols, device=w.device)
    W, Hd = W[:, perm], Hd[perm][:, perm]
    for _ in range(4):  # a rank-deficient H (few calibration tokens) can need more damping than asked for
        try:
            Hp = Hd + torch.diag(torch.full_like(Hd.diagonal(), damp * float(Hd.diagonal().mean())))
            U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True).float()
            break
        except torch.linalg.LinAlgError:
            damp *= 10
    else:
        raise UserError("GPTQ: the calibration Hessian is not positive definite even with 1000x GPTQ_DAMP; raise GPTQ_DAMP")
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros(W.size(0), i2 - i1, device=W.device), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = torch.clamp(torch.round(W1[:, i:i + 1] / S), -qmax, qmax)
            Q[:, i1 + i:i1 + i + 1] = q
            e = (W1[:, i:i + 1] - q * S) / U1[i, i]
            W1[:, i:] -= e @ U1[i:i + 1, i:]
            E1[:, i:i + 1] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    d = w.repeat(C, 1) - Q * S
    err = ((d @ H.float()) * d).sum(dim=1).view(C, rows)
    best = err.argmin(dim=0)
    pick = best.view(1, -1, 1)
    q = Q.view(C, rows, cols).gather(0, pick.expand(1, rows, cols))[0]
    return q.to(torch.int8), scale.gather(0, pick)[0, :, 0].half(), best


def quant_fields(t: Tensor, bits: int, hp, H: Tensor | None = None, table: bool = False, name: str = "") -> dict:
    """An entry's int scheme, symbols, fp16 scales, mean chosen scale candidate and reconstruction MSE: GPTQ when
    QUANT_METHOD=gptq and the matrix has a Hessian (tables that are only looked up have none; SDCLIP_LAMBDA applies
    there), else RTN."""
    stat, cands = quant_spec(hp, name, table)
    if H is not None and hp["QUANT_METHOD"] == "gptq":
        mult = sdclip_rows(t, H, hp["SDCLIP_LAMBDA"]) if stat == "std" and hp["SDCLIP_LAMBDA"] else None
        q, s, best = gptq(t, H, bits, cands, stat, damp=hp["GPTQ_DAMP"], mult=mult)
    else:
        q, s, best = quantize_rows(t, bits, cands, stat)
    mse = float((q.float() * s.float()[:, None] - t.float()).square().mean())
    return dict(scheme=f"int{bits}", q=q, scale=s, clip=float(torch.tensor(cands)[best.cpu()].mean()), mse=mse)


def quantize_state(state: dict[str, Tensor], kinds: dict[str, tuple[int, bool]], hp: Config, hessians: dict | None = None
                   ) -> tuple[list[dict], dict[str, Tensor]]:
    """Per tensor: intN rows for matrices/tables over QUANT_MIN_NUMEL values (kinds: name -> (bits, is a table), from
    the modules), int8 rows (RTN) for smaller matrices with SMALL_BITS=8, else fp16, fp32 for vectors and controls.
    Returns entries (meta + arrays) and the float originals of the quantized tensors (for LQER and the budget fit)."""
    entries, originals, hessians = [], {}, hessians or {}
    for name, t in state.items():
        t = t.detach()
        e = dict(name=name, shape=list(t.shape))
        if name in kinds and t.numel() > hp["QUANT_MIN_NUMEL"]:
            bits, table = kinds[name]
            e.update(quant_fields(t, bits, hp, hessians.get(name), table, name))
            originals[name] = t.float()
        elif t.ndim == 2 and hp["SMALL_BITS"] == 8:
            q, s, _ = quantize_rows(t, 8, [1.0])
            e.update(scheme="int8", q=q, scale=s)
        else:
            e.update(scheme="fp16" if t.ndim == 2 else "fp32", data=t.to(torch.float16 if t.ndim == 2 else torch.float32))
        entries.append(e)
    return entries, originals


def entropy_bytes(entries: list[dict]) -> int:
    """Order-0 entropy bound of the quantized symbols plus raw bytes of everything else: a cheap size forecast
    (zstd-22 lands within about 1% of it on int6 rows)."""
    total = 0.0
    for e in entries:
        if "q" in e:
            p = torch.bincount(e["q"].flatten().long() + 128, minlength=256).double()
            p = p[p > 0] / p.sum()
            total += float(-(p * p.log2()).sum()) * e["q"].numel() / 8 + 2 * e["scale"].numel()
        else:
            total += e["data"].numel() * e["data"].element_size()
    return int(total)


def quantize_asym(x: Tensor, bits: int, group: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric rounding to 0..2^bits-1: x ~ q * scale + zero, one fp16 scale and zero per row, or per `group`
    consecutive values of the flattened x (LQER's factors); q keeps x's shape."""
    g = x.reshape(-1, group) if group else x
    lo, hi = g.amin(dim=1), g.amax(dim=1)
    s, z = ((hi - lo) / (2 ** bits - 1)).clamp_min(SCALE_FLOOR).half(), lo.half()
    q = torch.clamp(torch.round((g - z.float()[:, None]) / s.float()[:, None]), 0, 2 ** bits - 1)
    return q.to(torch.int8).view_as(x), s, z


def dequant_asym(q: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """Inverse of quantize_asym: the group size is q's size over the number of scales."""
    return (q.float().reshape(s.numel(), -1) * s.float()[:, None] + z.float()[:, None]).view(q.shape)


def output_error(E: Tensor, H: Tensor) -> float:
    """tr(E H E^T): the squared output error summed over the calibration inputs, E = w - w_hat."""
    return float(((E.double() @ H.double()) * E.double()).sum())


def lqer_fields(w: Tensor, e: dict, H: Tensor, hp: Config) -> dict | None:
    """LQER: the rank-LQER_RANK A B closest to the quantization error E = w - w_hat in output error, i.e. minimizing
    ||(E - A B) L|| with H = L L^T (damped as in GPTQ): the truncated SVD of E L, mapped back through L^-1. Both
    factors ship asymmetric per row at LQER_BITS; None if the damped H is not positive definite."""
    E = (w.float() - e["q"].float() * e["scale"].float()[:, None]).double()
    Hd = H.double().clone()
    Hd.diagonal().add_((Hd.diagonal() == 0).double() + hp["GPTQ_DAMP"] * float(Hd.diagonal().mean()))
    L, info = torch.linalg.cholesky_ex(Hd)
    if info:
        return None
    U, S, Vh = torch.linalg.svd(E @ L, full_matrices=False)
    r = min(hp["LQER_RANK"], S.numel())
    A = U[:, :r] * S[:r].sqrt()
    Bt = torch.linalg.solve_triangular(L.T, Vh[:r].T * S[:r].sqrt(), upper=True)  # B = S^1/2 Vh L^-1
    g = hp["LQER_GROUP"] if hp["LQER_GROUP"] and A.numel() % hp["LQER_GROUP"] == Bt.numel() % hp["LQER_GROUP"] == 0 else 0
    (la, la_s, la_z), (lb, lb_s, lb_z) = (quantize_asym(f.float().contiguous(), hp["LQER_BITS"], g) for f in (A, Bt.T))
    return dict(lqer=r, **({"lqer_group": g} if g else {}), la=la, la_s=la_s, la_z=la_z, lb=lb, lb_s=lb_s, lb_z=lb_z)


def lqer_product(e: dict) -> Tensor:
    return dequant_asym(e["la"], e["la_s"], e["la_z"]) @ dequant_asym(e["lb"], e["lb_s"], e["lb_z"])


def add_lqer(entries: list[dict], originals: dict[str, Tensor], hessians: dict[str, Tensor], hp: Config) -> str:
    """Give the LQER_TOP quantized matrices with the largest output error (those with a Hessian) an LQER correction,
    kept only where it lowers that error; returns the log line."""
    def err(e, corr=0.0):
        return output_error(originals[e["name"]] - e["q"].float() * e["scale"].float()[:, None] - corr, hessians[e["name"]])
    cands = sorted(((err(e), i) for i, e in enumerate(entries) if e["name"] in originals and e["name"] in hessians),
                   key=lambda c: (-c[0], c[1]))[:hp["LQER_TOP"]]
    done = []
    for before, i in cands:
        e = entries[i]
        f = lqer_fields(originals[e["name"]], e, hessians[e["name"]], hp)
        after = err(e, lqer_product(f)) if f else before
        if after < before:
            entries[i] = e | f
            done.append(f"{e['name']}:{before:.4g}->{after:.4g}")
    return f"lqer: rank:{hp['LQER_RANK']} bits:{hp['LQER_BITS']} corrected {len(done)} of {len(cands)} (output error " \
           f"tr(E H E^T) before->after): {' '.join(done) or '-'}"


# ----------------------------------------------------------------------------- model
# GPT: tied int8 embedding, bigram hash, SmearGate, value embeddings, attention (RoPE, QK gain, XSA, FA3/SDPA,
# DOC_MASK), relu2/leaky2 MLP, parallel blocks, U-Net skips (gated), depth recurrence, logit softcap; Switches.
@dataclasses.dataclass
class Switches:
    """The switches that flip while a run goes on (weights and optimizer state aside), in one place; checkpoints
    save exactly this."""
    loops: int = 0  # extra passes through LOOP_LAYERS switched on (LOOP_START)
    qat: bool = False  # late QAT: matrices compute with their quantized weights (QAT_THRESHOLD)
    doc_mask: bool = False  # attention within documents (DOC_MASK; TTT=doc's windows hold one document: off there)


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


class QLinear(nn.Module):
    """Bias-free linear layer whose weight ships as int6 (if large enough). With late QAT it computes with
    w + stopgrad(Q(w) - w), Q being the exporter's own quantizer, once the `qat` buffer is switched on."""

    def __init__(self, fan_in: int, fan_out: int, bits: int = 6, init: str = "ortho"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.bits, self.init = bits, init  # init: ortho, zero, or ortho_scaled (x 1/sqrt(2 layers))
        self.register_buffer("qat", torch.zeros((), dtype=torch.bool), persistent=False)
        self.qspec: tuple | None = None  # set by GPT when QAT can switch on; None = no fake-quant ops at all
        self.lora: tuple[Tensor, Tensor, float] | None = None  # TTT=doc: per-row adapter (A: B x r x in, B: B x out x r, scale)

    def qweight(self) -> Tensor:
        return self.weight if self.qspec is None else fake_quant(self.weight, self.bits, self.qspec, self.qat)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.qweight().to(x.dtype))
        return y if self.lora is None else y + lora_out(x, self.lora)


def lora_out(x: Tensor, lora: tuple[Tensor, Tensor, float]) -> Tensor:
    """A TTT=doc adapter's output, one adapter per batch row: scale * (x A^T) B^T."""
    a, b, scale = lora
    return scale * ((x @ a.transpose(1, 2).to(x.dtype)) @ b.transpose(1, 2).to(x.dtype))


class QEmbedding(QLinear):
    """Embedding table (vocab x dim), shipped as int8 per row (or fp16 with bits=16), fake-quantized like QLinear."""

    def __init__(self, num: int, dim: int, std: float, bits: int = 8):
        super().__init__(dim, num, bits=bits)
        self.std = std

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.qweight())


def rope_tables(seq_len: int, rope_dims: int, base: float, train_len: int, device) -> tuple[Tensor, Tensor]:
    """cos/sin for the rotated dims; beyond the training length the base is NTK-scaled to keep them in range."""
    if seq_len > train_len and rope_dims > 2:
        base = base * (seq_len / train_len) ** (rope_dims / (rope_dims - 2))
    inv = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    f = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv)
    return f.cos()[None, :, None, :], f.sin()[None, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    r = cos.size(-1)
    x1, x2, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: tuple = ("sdpa", None)) -> Tensor:
    """Causal attention on (B, T, H, D) tensors with grouped KV heads, the way `mask` (GPT.attn_mask) says: ("fa3",
    None) FlashAttention 3; ("flex", block mask) FlexAttention; ("sdpa", None) causal SDPA; ("sdpa", (B, 1, T, T)
    bool, True = may attend) SDPA with that mask, KV heads repeated so a fused masked kernel can run."""
    kind, mask = mask
    if kind == "fa3":
        out = _fa3(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
        return out[0] if isinstance(out, tuple) else out
    if kind == "flex":
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                           enable_gqa=q.size(2) != k.size(2))
        return y.transpose(1, 2)
    if mask is not None and q.size(2) != k.size(2):
        k, v = (t.repeat_interleave(q.size(2) // k.size(2), dim=2) for t in (k, v))
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, qk_gain, xsa: bool, has_ve: bool, gate: tuple[int, float] | None = None):
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.q, self.k, self.v = QLinear(dim, dim), QLinear(dim, kv_heads * self.d), QLinear(dim, kv_heads * self.d)
        self.o = QLinear(dim, dim, init="zero")
        self.q_gain = nn.Parameter(torch.full((heads,), qk_gain))
        self.ve_scale = nn.Parameter(torch.ones(1)) if has_ve else None
        self.xsa = xsa
        self.gate_window, self.gate_scale = gate or (0, 0.0)  # ATTN_GATE: window of input channels, logit scale
        self.gate = nn.Parameter(torch.zeros(heads, self.gate_window)) if gate else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ve: Tensor | None, mask: tuple = ("sdpa", None)) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.d)
        k = self.k(x).view(B, T, self.kvh, self.d)
        v = self.v(x).view(B, T, self.kvh, self.d)
        if ve is not None:
            v = v + self.ve_scale.to(v.dtype) * ve.view(B, T, self.kvh, self.d)
        q = rms_norm(q) * self.q_gain.to(q.dtype)[:, None]
        k = rms_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attention(q, k, v, mask)
        if self.xsa:  # drop each head's component along its own token's (normalized) value vector
            vn = F.normalize(v.float(), dim=-1)[:, :, :, None].type_as(y)
            y = y.view(B, T, self.kvh, self.h // self.kvh, self.d)
            y = (y - (y * vn).sum(-1, keepdim=True) * vn).view(B, T, self.h, self.d)
        if self.gate is not None:  # each head's output x sigmoid(scale * w_h . x[:window])
            y = y * torch.sigmoid(self.gate_scale * F.linear(x[..., :self.gate_window], self.gate.to(x.dtype)))[..., None]
        return self.o(y.reshape(B, T, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, dim, mult, act):
        super().__init__()
        self.fc, self.proj = QLinear(dim, mult * dim), QLinear(mult * dim, dim, init="zero")
        self.slope = 0.5 if act == "leaky2" else 0.0

    def forward(self, x):
        return self.proj(F.leaky_relu(self.fc(x), self.slope).square())


class Block(nn.Module):
    def __init__(self, arch, i: int, has_ve: bool):
        super().__init__()
        dim = arch["MODEL_DIM"]
        self.attn = Attention(dim, arch["NUM_HEADS"], arch["NUM_KV_HEADS"], arch["QK_GAIN_INIT"],
                              i >= arch["NUM_LAYERS"] - arch["XSA_LAST_N"], has_ve,
                              (arch["GATE_WINDOW"], arch["ATTN_GATE_SCALE"]) if arch["ATTN_GATE"] else None)
        self.mlp = MLP(dim, arch["MLP_MULT"], arch["MLP_ACT"])
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))  # mix of x and the embedding x0
        self.ln = 1.0 / math.sqrt(i + 1) if arch["LN_SCALE"] else 1.0
        self.parallel = 0 <= arch["PARALLEL_FROM"] <= i
        self.lanes = self.parallel and bool(arch["PARALLEL_LANES"])
        if self.lanes:  # each lane's residual weight, and how much of the attention (row 0) and MLP (row 1) goes to each lane
            self.lane_resid, self.lane_post = nn.Parameter(torch.full((2,), 1.1)), nn.Parameter(torch.ones(2, 2))

    def forward(self, x, x0, cos, sin, ve, mask=("sdpa", None)):
        """x: the residual stream, or (lane 0, lane 1) in the decoder half under PARALLEL_LANES (then both come back)."""
        mix = self.resid_mix.to(x[0].dtype if isinstance(x, tuple) else x.dtype)
        if isinstance(x, tuple):
            l0, l1 = x
            a = self.attn_scale.to(l0.dtype) * self.attn(rms_norm(mix[0] * l0 + mix[1] * x0) * self.ln, cos, sin, ve, mask)
            m = self.mlp_scale.to(l0.dtype) * self.mlp(rms_norm(l1) * self.ln)
            r, p = self.lane_resid.to(l0.dtype), self.lane_post.to(l0.dtype)
            return r[0] * l0 + p[0, 0] * a + p[1, 0] * m, r[1] * l1 + p[0, 1] * a + p[1, 1] * m
        x = mix[0] * x + mix[1] * x0
        a = self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.ln, cos, sin, ve, mask)
        if self.parallel and not self.lanes:  # GPT-J form: attention and MLP both read x
            return x + a + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln)
        x = x + a
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln)


FUSED_CE_CHUNK = 8192  # rows per chunk of SoftcapCE: 8192 x vocabulary 8192 fp32 logits = 256 MiB at a time


class SoftcapCE(torch.autograd.Function):
    """Per-token cross-entropy of cap * tanh(h W^T / cap) against y, FUSED_CE_CHUNK rows at a time, that keeps only h
    and W for the backward pass (which recomputes each chunk's logits): the (tokens x vocab) logits and their
    gradient never exist whole. The same numerics as the plain path: h W^T in h's dtype, the rest in fp32."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, y: Tensor, cap: float) -> Tensor:
        ctx.save_for_backward(h, w, y)
        ctx.cap = cap
        out = []
        for i in range(0, h.size(0), FUSED_CE_CHUNK):
            z = cap * torch.tanh(F.linear(h[i:i + FUSED_CE_CHUNK], w.to(h.dtype)).float() / cap)
            out.append(torch.logsumexp(z, dim=1) - z.gather(1, y[i:i + FUSED_CE_CHUNK, None])[:, 0])
        return torch.cat(out)

    @staticmethod
    def backward(ctx, g: Tensor):
        h, w, y = ctx.saved_tensors
        wd, gh, gw = w.to(h.dtype), torch.empty_like(h), torch.zeros_like(w, dtype=torch.float32)
        for i in range(0, h.size(0), FUSED_CE_CHUNK):
            hc, yc = h[i:i + FUSED_CE_CHUNK], y[i:i + FUSED_CE_CHUNK]
            t = torch.tanh(F.linear(hc, wd).float() / ctx.cap)
            p = torch.softmax(ctx.cap * t, dim=1)
            p[torch.arange(len(yc), device=p.device), yc] -= 1
            dz = (p * g[i:i + FUSED_CE_CHUNK, None].float() * (1 - t * t)).to(h.dtype)  # d loss / d (h W^T)
            gh[i:i + FUSED_CE_CHUNK] = dz @ wd
            gw += (dz.T @ hc).float()
        return gh, gw.to(w.dtype), None, None


def bigram_buckets(ids: Tensor, buckets: int) -> Tensor:
    """Hash of (previous, current) token into buckets-1 bins (the 1.1233 record's: int32 products, wrapping);
    position 0 gets the reserved last bucket."""
    t = ids.to(torch.int32)
    h = torch.remainder(torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]), buckets - 1)
    return F.pad(h, (1, 0), value=buckets - 1).long()


class GPT(nn.Module):
    def __init__(self, arch, embed_bits: int = 8):
        """arch: the ARCH_KEYS settings (any mapping holding them); embed_bits: 8, or 16 = the table ships in fp16."""
        super().__init__()
        self.arch = {k: arch[k] for k in ARCH_KEYS}
        self.sw = Switches(doc_mask=bool(arch["DOC_MASK"]))
        self.attn_kernel, self.fused_ce = "sdpa", False  # how to compute, set by whoever runs the model (build_model)
        self.lora: tuple[Tensor, Tensor, float] | None = None  # TTT_LORA_HEAD: the adapter on the logits (QLinear.lora's form)
        V, dim, L = arch["VOCAB_SIZE"], arch["MODEL_DIM"], arch["NUM_LAYERS"]
        kv_dim = arch["NUM_KV_HEADS"] * (dim // arch["NUM_HEADS"])
        self.tok_emb = QEmbedding(V, dim, std=0.005, bits=embed_bits)
        self.bigram = self.bigram_proj = self.bigram_scale = None
        if arch["BIGRAM_VOCAB_SIZE"]:
            self.bigram = QEmbedding(arch["BIGRAM_VOCAB_SIZE"], arch["BIGRAM_DIM"], std=0.0)
            self.bigram_proj = QLinear(arch["BIGRAM_DIM"], dim, init="ortho_scaled")
            self.bigram_scale = nn.Parameter(torch.tensor(0.05))
        self.smear = self.smear_w = None
        if arch["SMEAR_GATE"] == 1:
            self.smear = nn.Parameter(torch.zeros(dim))
        elif arch["SMEAR_GATE"] == 2:  # the gate's weights on x[:GATE_WINDOW] and its strength lambda, both from 0
            self.smear_w, self.smear_lambda = nn.Parameter(torch.zeros(1, arch["GATE_WINDOW"])), nn.Parameter(torch.zeros(1))
        self.ve_layers = ve_layers(arch)
        self.ve = self.ve_proj = self.ve_shared_scale = None
        if self.ve_layers:  # one table for all VE layers: v += layer scale * shared scale * proj(table[ids])
            self.ve = QEmbedding(V, arch["VE_DIM"], std=0.01)
            self.ve_proj = QLinear(arch["VE_DIM"], kv_dim, init="ortho_scaled")
            self.ve_shared_scale = nn.Parameter(torch.tensor(0.1))
        self.blocks = nn.ModuleList(Block(arch, i, i in self.ve_layers) for i in range(L))
        loop = loop_layers(arch)
        self.orders = [list(range(loop[0] if loop else L)) + loop * (1 + r) + list(range(loop[-1] + 1 if loop else L, L))
                       for r in range(arch["LOOP_REPEATS"] + 1 if loop else 1)]  # block order with r extra passes
        n_skip = len(self.orders[-1]) // 2
        self.skip_weights = nn.Parameter(torch.ones(n_skip, dim))
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, dim)) if arch["SKIP_GATES"] else None
        self.final_norm = RMSNorm()  # a module, so GPTQ calibration can hook the tied output layer's input
        self._init(L)

    def linears(self) -> list[tuple[str, QLinear]]:
        """The matrices applied to activations, not the embedding tables: what Muon trains, GPTQ calibrates on its
        inputs and TTT=doc adapts."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, QLinear) and not isinstance(m, QEmbedding)]

    @torch.no_grad()
    def _init(self, L):
        for m in self.modules():
            if isinstance(m, QEmbedding):
                nn.init.normal_(m.weight, std=m.std) if m.std else nn.init.zeros_(m.weight)
            elif isinstance(m, QLinear):
                if m.init == "zero":  # block output projections: every block starts as the identity
                    nn.init.zeros_(m.weight)
                elif min(m.weight.shape) >= 64:
                    nn.init.orthogonal_(m.weight)
                else:
                    nn.init.normal_(m.weight, std=m.weight.size(1) ** -0.5)
                if m.init == "ortho_scaled":
                    m.weight.mul_(1.0 / math.sqrt(2 * L))

    def set_qat(self, hp: Config | None) -> None:
        """Put the exporter's own quantizer (quant_spec: the same scales) into the forward pass of every matrix that
        ships quantized, gated by each module's `qat` buffer (off until switch(qat=True)); None removes it."""
        for n, m in self.named_modules():
            if isinstance(m, QLinear):
                ships = hp is not None and m.bits < 16 and m.weight.numel() > hp["QUANT_MIN_NUMEL"]
                m.qspec = quant_spec(hp, f"{n}.weight", isinstance(m, QEmbedding)) if ships else None

    def switch(self, **changes) -> None:
        """Set Switches fields; the QAT flag also goes into every matrix's `qat` buffer."""
        for k, v in changes.items():
            setattr(self.sw, k, type(getattr(self.sw, k))(v))
        for m in self.modules():
            if "qat" in changes and isinstance(m, QLinear):
                m.qat.fill_(self.sw.qat)

    def attn_mask(self, ids: Tensor) -> tuple:
        """attention()'s mask for this batch, by kernel (attn_kernel): causal, or block-diagonal causal under the
        document mask (a query sees the keys of its own document only)."""
        B, T = ids.shape
        doc = torch.cumsum(ids == BOS_ID, dim=1) if self.sw.doc_mask else None
        if self.attn_kernel == "flex":
            def keep(b, h, i, j):
                return (i >= j) & (doc[b, i] == doc[b, j]) if doc is not None else i >= j
            return "flex", create_block_mask(keep, B if doc is not None else None, None, T, T, device=ids.device)
        if doc is not None:
            return "sdpa", ((doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device=ids.device).tril())[:, None]
        return self.attn_kernel if self.attn_kernel == "fa3" else "sdpa", None

    def stored_config(self) -> dict:
        """What the artifact records: the architecture and the loop depth reached."""
        return self.arch | {"LOOP_ACTIVE": self.sw.loops}

    def forward(self, ids: Tensor, targets: Tensor, per_token: bool = False) -> Tensor:
        B, T = ids.shape
        w_emb = self.tok_emb.qweight()
        x = F.embedding(ids, w_emb)
        mask = self.attn_mask(ids)
        if self.bigram is not None:
            nb = self.bigram.weight.size(0)
            h = bigram_buckets(ids, nb)
            h = torch.where(ids == BOS_ID, nb - 1, h) if self.sw.doc_mask else h  # a BOS hashes as a stream start
            x = x + self.bigram_scale.to(x.dtype) * self.bigram_proj(self.bigram(h))
        if self.smear_w is not None:  # x_t += lambda sigmoid(w . x_t[:window]) x_{t-1}; not at a document's BOS
            g = self.smear_lambda.to(x.dtype) * torch.sigmoid(F.linear(x[:, 1:, :self.smear_w.size(1)], self.smear_w.to(x.dtype)))
            x = torch.cat((x[:, :1], x[:, 1:] + g * x[:, :-1] * (ids[:, 1:, None] != BOS_ID)), dim=1)
        x = rms_norm(x)
        if self.smear is not None:  # x_t <- (1 - g) x_t + g x_{t-1}; a document's BOS takes nothing from the previous one
            g = torch.sigmoid(self.smear.to(x.dtype))
            x = (1 - g) * x + g * F.pad(x[:, :-1] * (ids[:, 1:, None] != BOS_ID), (0, 0, 1, 0))
        x0 = x
        ve = self.ve_shared_scale.to(x.dtype) * self.ve_proj(self.ve(ids)) if self.ve is not None else None
        hd = self.arch["MODEL_DIM"] // self.arch["NUM_HEADS"]
        cos, sin = rope_tables(T, self.arch["ROPE_DIMS"] or hd, self.arch["ROPE_BASE"], self.arch["TRAIN_SEQ_LEN"], ids.device)
        order = self.orders[self.sw.loops]  # U-Net over the virtual layers: the first half feeds skips to the second
        n_enc, skips = len(order) // 2, []
        for k, i in enumerate(order):
            j = k - n_enc
            if j >= 0 and self.blocks[i].lanes and not isinstance(x, tuple):
                x = (x, x)  # PARALLEL_LANES: both lanes start from the stream
            if 0 <= j < self.skip_weights.size(0) and skips:
                h = x[0] if isinstance(x, tuple) else x  # the skip feeds lane 0
                s = self.skip_weights[j].to(h.dtype) * skips.pop()
                h = h + s if self.skip_gates is None else torch.lerp(s, h, torch.sigmoid(self.skip_gates[j].to(h.dtype)))
                x = (h, x[1]) if isinstance(x, tuple) else h
            x = self.blocks[i](x, x0, cos, sin, ve if i in self.ve_layers else None, mask)
            if k < n_enc:
                skips.append(x)
        x = 0.5 * (x[0] + x[1]) if isinstance(x, tuple) else x
        cap, h = self.arch["LOGIT_SOFTCAP"], self.final_norm(x)
        if self.fused_ce and torch.is_grad_enabled() and self.lora is None:  # training and TTT's SGD: the chunked form
            loss = SoftcapCE.apply(h.reshape(B * T, -1), w_emb, targets.reshape(-1), cap)
            return loss.view(B, T) if per_token else loss.mean()
        logits = F.linear(h, w_emb.to(x.dtype))
        logits = cap * torch.tanh((logits if self.lora is None else logits + lora_out(h, self.lora)).float() / cap)
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), reduction="none" if per_token else "mean")
        return loss.view(B, T) if per_token else loss




def quant_kinds(model: GPT) -> dict[str, tuple[int, bool]]:
    """name -> (bits, is an embedding table) of every weight that ships as integers."""
    return {f"{n}.weight": (m.bits, isinstance(m, QEmbedding)) for n, m in model.named_modules()
            if isinstance(m, QLinear) and m.bits < 16}


# ----------------------------------------------------------------------------- evaluation
# The exact metric: every validation target scored once, in non-overlapping or sliding windows, nats summed in
# float64 and divided by the bytes the targets decode to (val_bpb), split across ranks.
def window_plan(n_tokens: int, L: int, stride: int) -> tuple[Tensor, Tensor]:
    """Windows over a stream of n tokens whose targets are positions 1..n-1. Window k starts at k*stride and
    predicts targets start+1..start+L; the first scores all L, each later one only its last `stride`. If the last
    full window ends before the stream, one more window aligned to the end scores the remaining targets. So every
    target is scored exactly once, and stride == L is the standard non-overlapping evaluation (tail included).
    Returns (starts, number of scored targets per window)."""
    last = n_tokens - 1
    if not 0 < stride <= L <= last:
        raise UserError(f"cannot evaluate {n_tokens} tokens with window {L} and stride {stride}: need 0 < stride <= length < tokens")
    n_full = (last - L) // stride + 1
    starts = torch.arange(n_full, dtype=torch.long) * stride
    score = torch.full((n_full,), stride, dtype=torch.long)
    score[0] = L
    end = (n_full - 1) * stride + L
    if end < last:
        starts, score = torch.cat((starts, torch.tensor([last - L]))), torch.cat((score, torch.tensor([last - end])))
    return starts, score


def score_sums(nll: Tensor, x: Tensor, y: Tensor, mask: Tensor, luts, nbytes: Tensor | None = None) -> Tensor:
    """float64 (nll, bytes, tokens) summed over the masked targets y of inputs x: bytes as the challenge counts them,
    a piece's bytes plus its leading space unless the previous token (x) is a boundary, or `nbytes` (the byte
    sidecar's, Validation.bytes_at) when given."""
    if nbytes is None:
        base, lead, bound = luts
        nbytes = base[y] + (lead[y] & ~bound[x])
    return torch.stack((torch.where(mask, nll.double(), 0.0).sum(), (nbytes * mask).sum().double(), mask.sum().double()))


@torch.no_grad()
def eval_sums(ctx: Context, forward, val: Validation, L: int, stride: int, batch: int, *, desc="eval", windows=None,
              out: Tensor | None = None) -> Tensor:
    """This rank's float64 sums (nll, bytes, tokens) over its contiguous share of the windows, `batch` windows per
    forward pass; the last batch is padded with fully masked windows, so shapes never change. `windows` (starts, lo,
    hi: positions lo..hi-1 scored) replaces window_plan's; `out`, if given, gets each scored target's nll at its index."""
    tokens, device = val.tokens, val.tokens.device
    if windows is None:
        starts, score = window_plan(len(tokens), L, stride)
        windows = (starts, L - score, torch.full_like(score, L))
    starts, first, end = (t.to(device) for t in windows)
    per = -(-len(starts) // ctx.world)
    lo, hi = min(ctx.rank * per, len(starts)), min((ctx.rank + 1) * per, len(starts))
    offs, pos = torch.arange(L + 1, device=device), torch.arange(L, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    bar = ctx.progress(hi - lo, desc)
    for b in range(lo, hi, batch):
        s, f, e = (t[b:min(b + batch, hi)] for t in (starts, first, end))
        n = len(s)
        if n < batch:
            s, f, e = (F.pad(t, (0, batch - n)) for t in (s, f, e))
        tok = tokens[s[:, None] + offs].long()
        x, y = tok[:, :-1], tok[:, 1:]
        with ctx.autocast():
            nll = forward(x, y)
        mask = (pos[None, :] >= f[:, None]) & (pos[None, :] < e[:, None])
        sums += score_sums(nll, x, y, mask, val.luts, val.bytes_at(s[:, None] + 1 + pos))
        if out is not None:
            out[(s[:, None] + 1 + pos)[mask]] = nll[mask].double()
        bar.update(n)
    bar.close()
    return sums


def metrics(ctx: Context, sums: Tensor) -> tuple[float, float, int]:
    """(val_loss in nats/token, val_bpb, scored tokens) from every rank's eval_sums."""
    if ctx.world > 1:
        dist.all_reduce(sums)
    loss_sum, byte_sum, count = sums.tolist()
    return loss_sum / count, loss_sum / math.log(2) / byte_sum, int(count)


def evaluate(ctx: Context, forward, val: Validation, L: int, stride: int, batch: int, *, desc="eval") -> tuple[float, float, int]:
    """(val_loss in nats/token, val_bpb, scored tokens) over every target of `val`, all ranks together."""
    return metrics(ctx, eval_sums(ctx, forward, val, L, stride, batch, desc=desc))


def eval_forward(model: GPT, use_compile: bool):
    """Per-token losses of the model in eval mode (compiled once for fixed shapes)."""
    model.eval()
    fwd = lambda x, y: model(x, y, per_token=True)
    return torch.compile(fwd, dynamic=False) if use_compile else fwd


# ----------------------------------------------------------------------------- optimizer
# Muon (Newton-Schulz quintic or Polar Express, MuonEq-R rows) for the matrices, AdamW for tables and scalars, the
# learning-rate schedule (warmdown by steps, time or budget fraction, MIN_LR floor) and the training budget.
POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),  # Amsel et al. 2025, 5 iterations,
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),  # safety factor 1.02; later iterations
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),  # reuse the last triple
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def newton_schulz(g: Tensor, steps: int, kind: str = "quintic", dtype=torch.float32) -> Tensor:
    """Approximate orthogonalization (U V^T of g's SVD) with a quintic Newton-Schulz iteration in `dtype`: one fixed
    coefficient triple (quintic), or Polar Express's triple per iteration (polar). g: one matrix, or a batch of
    same-shape matrices (batch, rows, cols), each orthogonalized on its own."""
    coeffs = [(3.4445, -4.7750, 2.0315)] * steps if kind == "quintic" else [POLAR_EXPRESS[min(i, 4)] for i in range(steps)]
    x = g.to(dtype)
    x = x / ((x.norm() if x.ndim == 2 else x.norm(dim=(1, 2), keepdim=True)) * (1.02 if kind == "polar" else 1.0) + 1e-7)
    wide = x.size(-2) > x.size(-1)
    if wide:
        x = x.mT
    for a, b, c in coeffs:
        m = x @ x.mT
        x = a * x + (b * m + c * m @ m) @ x
    return x.mT if wide else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalized by Newton-Schulz, scaled by sqrt(max(1, rows/cols)), decoupled weight decay.
    Rank r orthogonalizes matrices r, r+W, ... (MUON_BATCHED: those of one shape in one batched call) into its shard
    of a flat buffer; one all-gather of the shards (half the bytes of an all-reduce) gives every rank every update,
    bit for bit."""

    def __init__(self, params, *, lr, momentum, steps, wd, rank=0, world=1, ns="quintic", row_norm=False, dtype=torch.float32,
                 batched=False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, steps=steps, wd=wd, ns=ns, row_norm=row_norm,
                                            batched=batched))
        self.rank, self.world, self.dtype = rank, world, dtype  # dtype: Newton-Schulz and the all-reduced buffer

    def _flat(self, group):
        """One update buffer per group (NS dtype, all-gathered): one equal-sized shard per rank holding the matrices
        it owns, padded; its views per parameter and their fp32 copies', built once."""
        if "flat" not in group:
            ps, W = group["params"], self.world
            size = max(sum(p.numel() for p in ps[r::W]) for r in range(W))
            flat = torch.zeros(W * size, dtype=self.dtype, device=ps[0].device)
            full = flat if flat.dtype == ps[0].dtype else torch.zeros_like(flat, dtype=ps[0].dtype)
            offs = [0] * len(ps)
            for r in range(W):
                o = r * size
                for i in range(r, len(ps), W):
                    offs[i], o = o, o + ps[i].numel()
            group["flat"], group["full"], group["shard"] = flat, full, size
            group["views"] = [flat[o:o + p.numel()].view_as(p) for o, p in zip(offs, ps)]
            group["full_views"] = [full[o:o + p.numel()].view_as(p) for o, p in zip(offs, ps)]
        return group["flat"], group["full"], group["views"], group["full_views"]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            ps = group["params"]
            flat, full, views, full_views = self._flat(group)
            mine = ps[self.rank::self.world]
            bufs = [self.state[p].setdefault("m", torch.zeros_like(p)) for p in mine]
            grads = [p.grad for p in mine]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            nesterov = torch._foreach_add(grads, bufs, alpha=group["momentum"])
            if group["row_norm"]:  # MuonEq-R
                nesterov = [g / g.norm(dim=1, keepdim=True).clamp_min(1e-7) for g in nesterov]
            todo = list(zip(range(self.rank, len(ps), self.world), nesterov))
            batches = {}  # MUON_BATCHED: one call per shape; else one per matrix
            for i, g in todo:
                batches.setdefault(tuple(g.shape) if group["batched"] else i, []).append((i, g))
            for items in batches.values():
                g = items[0][1]
                out = newton_schulz(torch.stack([x for _, x in items]) if group["batched"] else g, group["steps"], group["ns"],
                                    self.dtype) * max(1.0, g.size(0) / g.size(1)) ** 0.5
                for k, (i, _) in enumerate(items):
                    views[i].copy_(out[k] if group["batched"] else out)
            if self.world > 1:
                n = group["shard"]
                dist.all_gather_into_tensor(flat, flat[self.rank * n:(self.rank + 1) * n])
            if full is not flat:
                full.copy_(flat)
            if group["wd"]:
                torch._foreach_mul_(ps, 1.0 - group["lr"] * group["wd"])
            torch._foreach_add_(ps, full_views, alpha=-group["lr"])


def build_optimizers(hp: Config, ctx: Context, model: GPT):
    matrices = [m.weight for _, m in model.linears()]
    tables = [m.weight for m in model.modules() if isinstance(m, QEmbedding)]
    seen = {id(p) for p in matrices + tables}
    scalars = [p for p in model.parameters() if id(p) not in seen]
    muon = Muon(matrices, lr=hp["MATRIX_LR"], momentum=hp["MUON_MOMENTUM"], steps=hp["MUON_BACKEND_STEPS"], wd=hp["MUON_WD"],
                rank=ctx.rank, world=ctx.world, ns=hp["MUON_NS"], row_norm=bool(hp["MUON_ROW_NORM"]), dtype=ctx.amp or torch.float32,
                batched=bool(hp["MUON_BATCHED"]))
    adam = torch.optim.AdamW([dict(params=tables, lr=hp["EMBED_LR"], weight_decay=hp["EMBED_WD"]),
                              dict(params=scalars, lr=hp["SCALAR_LR"], weight_decay=hp["ADAM_WD"])],
                             betas=(hp["BETA1"], hp["BETA2"]), eps=hp["ADAM_EPS"], foreach=True)
    for opt in (muon, adam):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [muon, adam]


@torch.no_grad()
def ema_update(ema: list[Tensor], params: list[Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * w, one fused foreach op over all tensors."""
    torch._foreach_lerp_(ema, params, 1.0 - decay)


def train_cap_ms(hp) -> float:
    """Wall-clock end of the training loop (0 = none): the cap, less GPTQ's calibration reserve under gptq."""
    reserve = hp["GPTQ_RESERVE_SECONDS"] if hp["QUANT_METHOD"] == "gptq" else 0.0
    return 1000 * (hp["MAX_WALLCLOCK_SECONDS"] - reserve) if hp["MAX_WALLCLOCK_SECONDS"] > 0 else 0.0


def budget_frac(hp, step: int, elapsed_ms: float) -> float:
    """Fraction of the training budget used: of ITERATIONS, or of the wall-clock cap if that comes first."""
    cap_ms = train_cap_ms(hp)
    return max(step / hp["ITERATIONS"], elapsed_ms / cap_ms if cap_ms > 0 else 0.0)


def lr_multiplier(hp, step: int, elapsed_ms: float) -> float:
    """1, then a linear warmdown towards 0 (floored at MIN_LR): over the last WARMDOWN_FRAC of the budget, or else
    over the last WARMDOWN_ITERS steps, measured in time with a wall-clock cap: remaining / (N * mean step time)."""
    wd, mult = hp["WARMDOWN_ITERS"], 1.0
    if hp["WARMDOWN_FRAC"] > 0:
        mult = min(1.0, (1.0 - budget_frac(hp, step, elapsed_ms)) / hp["WARMDOWN_FRAC"])
    elif wd > 0:
        mult = min(1.0, max(hp["ITERATIONS"] - step, 0) / wd)
        cap_ms = train_cap_ms(hp)
        if cap_ms > 0 and step > 0 and elapsed_ms > 0:
            mult = min(mult, max(cap_ms - elapsed_ms, 0.0) / (wd * elapsed_ms / step))
    return max(mult, hp["MIN_LR"])


# ----------------------------------------------------------------------------- checkpoints
# A run's whole state at a step boundary, written atomically by rank 0, verified and resumable on any world size.
CKPT_MAGIC = b"PGOLFCK\x01"  # file = magic + sha256(payload) + payload (torch.save of tensors, numbers and strings)
# Settings that do not change what a run computes (names, places, logging and checkpoint cadence, kernels): they may
# differ on resume, as may the world size, and the tools ignore them when comparing runs.
FREE_SETTINGS = ("RUN_ID", "LOG_DIR", "ARTIFACT", "DATA_PATH", "TOKENIZER_PATH", "COMPILE", "ATTN", "FUSED_CE", "TRAIN_LOG_EVERY",
                 "VAL_LOSS_EVERY", "CHECKPOINT_EVERY", "RESUME")


@dataclasses.dataclass
class TrainState:
    """What the training loop advances: weights (and their runtime Switches), optimizers, EMA, data position, step
    count, training milliseconds so far, and whether the size forecast was logged."""
    model: GPT
    opts: list
    ema: list[Tensor] | None
    loader: DistributedTokenLoader | ShuffleLoader
    step: int = 0
    elapsed_ms: float = 0.0
    forecast_done: bool = False
    size_forecast: object = None  # forecast()'s Future of the packed size (rank 0; not checkpointed)


def checkpoint_config(hp, files) -> dict:
    """What a checkpoint must share with the run that resumes it: every setting but FREE_SETTINGS, and the shards."""
    return {k: v for k, v in hp.items() if k not in FREE_SETTINGS} | {"train_shards": [os.path.basename(f) for f in files]}


@torch.no_grad()
def save_checkpoint(ctx: Context, path: str, config: dict, ts: TrainState) -> None:
    """Everything that determines the rest of the run, at a step boundary. Muon keeps momentum only for the matrices
    a rank owns: one all-reduce of a zero-filled buffer (each slot written by its owner) gives rank 0 all of it, so
    rank 0 writes one file, and it resumes on any world size (the global batch does not depend on it)."""
    t0, muon = time.perf_counter(), ts.opts[0]
    ps = [p for g in muon.param_groups for p in g["params"]]
    mine = {id(p) for g in muon.param_groups for p in g["params"][ctx.rank::ctx.world]}
    flat = torch.zeros(sum(p.numel() for p in ps), device=ps[0].device)
    for v, p in zip(flat.split([p.numel() for p in ps]), ps):
        if id(p) in mine and "m" in muon.state[p]:
            v.copy_(muon.state[p]["m"].flatten())
    if ctx.world > 1:
        dist.all_reduce(flat)

    def go():
        state = dict(config=config, step=ts.step, elapsed_ms=ts.elapsed_ms, switches=dataclasses.asdict(ts.model.sw),
                     forecast_done=ts.forecast_done,
                     loader=ts.loader.state(), rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state() if flat.is_cuda else None, model=ts.model.state_dict(),
                     ema=ts.ema, muon=flat, adam=ts.opts[1].state_dict())
        buf = io.BytesIO()
        torch.save(state, buf)
        payload = buf.getvalue()
        write_atomic(path, CKPT_MAGIC + hashlib.sha256(payload).digest() + payload, "checkpoint")
        ctx.log(f"checkpoint: step:{ts.step} path:{path} bytes:{len(payload) + 40} seconds:{time.perf_counter() - t0:.3f}")
    ctx.on_rank0(go)


def load_checkpoint(path: str, config: dict) -> dict:
    """Read and verify a checkpoint (weights_only: tensors and plain values, no code); one that is truncated, altered,
    foreign or written under other settings is refused with one line."""
    blob, n = read_file(path, "checkpoint"), len(CKPT_MAGIC)
    if not blob.startswith(CKPT_MAGIC):
        raise UserError(f"{path} is not a checkpoint written by train_gpt.py (bad magic)")
    if hashlib.sha256(blob[n + 32:]).digest() != blob[n:n + 32]:
        raise UserError(f"checkpoint {path} is corrupted or truncated (checksum mismatch); delete it to start over")
    try:
        ck = torch.load(io.BytesIO(blob[n + 32:]), map_location="cpu", weights_only=True)
        theirs = dict(ck["config"])
    except Exception:  # a valid checksum over something this version cannot read
        raise UserError(f"checkpoint {path} is malformed; it was not written by this version of train_gpt.py") from None
    diff = [f"{k}={theirs.get(k)!r} (now {config.get(k)!r})" for k in sorted(config.keys() | theirs.keys())
            if theirs.get(k) != config.get(k)]
    if diff:
        raise UserError(f"checkpoint {path} was written with other settings: {', '.join(diff[:4])}; use them or another RUN_ID")
    return ck


@torch.no_grad()
def restore_checkpoint(ck: dict, ts: TrainState) -> None:
    """Load a verified checkpoint into the live run: weights, Switches, optimizers, EMA, data position, RNG, step,
    training time and the forecast flag."""
    ts.model.load_state_dict(ck["model"])
    ts.model.switch(**ck["switches"])
    if ts.ema is not None:
        torch._foreach_copy_(ts.ema, ck["ema"])
    muon = ts.opts[0]
    ps = [p for g in muon.param_groups for p in g["params"]]
    mine = {id(p) for g in muon.param_groups for p in g["params"][muon.rank::muon.world]}
    for m, p in zip(ck["muon"].split([p.numel() for p in ps]), ps):
        if id(p) in mine:
            muon.state[p]["m"] = m.view_as(p).to(p.device, copy=True)
    ts.opts[1].load_state_dict(ck["adam"])
    ts.loader.restore(ck["loader"])
    torch.set_rng_state(ck["rng"])
    if ck["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ck["cuda_rng"])
    ts.step, ts.elapsed_ms, ts.forecast_done = ck["step"], ck["elapsed_ms"], ck["forecast_done"]


# ----------------------------------------------------------------------------- training loop
# Model + compile + DDP, warm-up that compiles every graph then is undone, the loop (LR and momentum schedules, EMA,
# loop depth and late-QAT switches, size forecast, checkpoints, SIGTERM) and the EMA weights at the end.
def build_model(hp: Config, ctx: Context):
    """The model to train (log: parameter count and features), and what steps it: compiled, wrapped in DDP."""
    model = GPT(hp.arch, embed_bits=hp["EMBED_BITS"]).to(ctx.device)
    model.attn_kernel, model.fused_ce = ctx.attn, bool(hp["FUSED_CE"])
    ctx.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    model.set_qat(hp if hp["QAT_THRESHOLD"] > 0 else None)
    xsa = [i for i, b in enumerate(model.blocks) if b.attn.xsa]
    ctx.log(f"features: attention:{ctx.attn} compile:{'on' if ctx.compile else 'off'} autocast:{'bf16' if ctx.amp else 'off'} "
            f"xsa_layers:{xsa} ve_layers:{model.ve_layers} layers_per_pass:{[len(o) for o in model.orders]} "
            f"ema:{hp['EMA_DECAY']} qat_threshold:{hp['QAT_THRESHOLD']} (every setting is in the log above)")
    fwd = torch.compile(model, dynamic=False) if ctx.compile else model
    ddp = nn.parallel.DistributedDataParallel(fwd, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                              broadcast_buffers=False) if ctx.world > 1 else fwd
    return model, ddp


def make_step(hp: Config, ctx: Context, ddp, opts):
    """One optimizer step over TRAIN_BATCH_TOKENS at the schedule's LR and Muon momentum; returns (mean loss, LR mult)."""
    accum, L, B = hp["MICRO_BATCHES"] // ctx.world, hp["TRAIN_SEQ_LEN"], hp["TRAIN_BATCH_TOKENS"]
    params = list(ddp.parameters())

    def step_fn(loader, step, elapsed_ms):
        mult = lr_multiplier(hp, step, elapsed_ms)
        frac = min(step / hp["MUON_MOMENTUM_WARMUP_STEPS"], 1.0) if hp["MUON_MOMENTUM_WARMUP_STEPS"] else 1.0
        opts[0].param_groups[0]["momentum"] = (1 - frac) * hp["MUON_MOMENTUM_WARMUP_START"] + frac * hp["MUON_MOMENTUM"]
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
        x, y = loader.next_batch(B, L)
        total = torch.zeros((), device=ctx.device)
        for i, (xm, ym) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
            sync = ddp.no_sync() if ctx.world > 1 and i < accum - 1 else contextlib.nullcontext()
            with sync, ctx.autocast():
                loss = ddp(xm, ym)
            (loss / accum).backward()
            total += loss.detach()
        if hp["GRAD_CLIP_NORM"] > 0:
            torch.nn.utils.clip_grad_norm_(params, hp["GRAD_CLIP_NORM"], foreach=True)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total / accum, mult
    return step_fn


def warm_up(hp: Config, ctx: Context, model: GPT, opts, step_fn, files) -> None:
    """WARMUP_STEPS steps that compile and warm every kernel (QAT branch and every loop depth included), then the
    weights and optimizer state are put back as they were."""
    if not hp["WARMUP_STEPS"]:
        return
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    loader = make_loader(hp, files, ctx)
    for s in range(hp["WARMUP_STEPS"]):
        model.switch(qat=hp["QAT_THRESHOLD"] > 0 and s >= hp["WARMUP_STEPS"] // 2, loops=s % len(model.orders))
        step_fn(loader, 0, 0.0)
    model.switch(qat=False, loops=0)
    model.load_state_dict(initial)
    for opt in opts:
        opt.state.clear()
    ctx.log(f"warmup_steps:{hp['WARMUP_STEPS']} done (weights and optimizer state restored)")


def forecast(hp: Config, ctx: Context, model: GPT, ema, step: int):
    """At the start of warmdown: the submission size of the current (EMA) weights rounded to nearest (GPTQ needs the
    final Hessians), packed by the artifact's own Packer in a background thread while training goes on (the codecs
    release the GIL). Returns a Future of the size on rank 0; export logs its error against the final size."""
    def go():
        from concurrent.futures import ThreadPoolExecutor
        names = [n for n, _ in model.named_parameters()]
        state = dict(zip(names, ema)) if ema is not None else model.state_dict()
        entries, _ = quantize_state(state, quant_kinds(model), hp)
        entries = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in e.items()} for e in entries]
        code, config = len(read_file(os.path.abspath(__file__), "script")), model.stored_config()

        def job():
            size = len(Packer(max(1, (os.cpu_count() or 1) // (2 * ctx.world)))(entries, config)) + code
            ctx.log(f"size_forecast:{size} limit:{hp['SIZE_LIMIT_BYTES']} step:{step} (the weights of this step rounded "
                    "to nearest and packed, + code bytes)")
            return size
        pool = ThreadPoolExecutor(1)
        future = pool.submit(job)
        pool.shutdown(wait=False)
        return future
    return ctx.on_rank0(go)


def update_switches(hp: Config, ctx: Context, ts: TrainState, mult: float) -> bool:
    """After a step: switch on the loop passes whose LOOP_START the budget has reached, late QAT once the LR
    multiplier drops below QAT_THRESHOLD, and log the size forecast at the start of warmdown. True if the loop depth
    changed."""
    model, frac = ts.model, budget_frac(hp, ts.step, ts.elapsed_ms)
    loops = sum(frac >= a for a in hp.loop_starts)
    changed = loops != model.sw.loops
    if changed:
        model.switch(loops=loops)
        ctx.log(f"layer_loop:enabled passes:{loops} step:{ts.step} frac:{frac:.3f} layers:{len(model.orders[loops])}")
    if not model.sw.qat and mult < hp["QAT_THRESHOLD"]:
        model.switch(qat=True)
        ctx.log(f"late_qat:enabled step:{ts.step} lr_mult:{mult:.3f}")
    if not ts.forecast_done and mult < 1.0:
        ts.forecast_done = True
        ts.size_forecast = forecast(hp, ctx, model, ts.ema, ts.step)
    return changed


def train(hp: Config, ctx: Context, val: Validation, run_id: str) -> TrainState:
    """Train to ITERATIONS or the wall-clock cap (less the GPTQ reserve), resuming from a checkpoint if asked;
    returns the final state, its model holding the EMA weights."""
    model, ddp = build_model(hp, ctx)
    opts = build_optimizers(hp, ctx, model)
    files = shard_files(hp, "train")
    accum = hp["MICRO_BATCHES"] // ctx.world
    ctx.log(f"train_shards:{len(files)} val_tokens:{len(val.tokens)} "
            f"val_bytes:{'tokenizer' if val.sidecar is None else 'sidecar'} world_size:{ctx.world} grad_accum_steps:{accum} "
            f"micro_batch_seqs:{hp['TRAIN_BATCH_TOKENS'] // hp['TRAIN_SEQ_LEN'] // ctx.world // accum}")
    ck_steps, ck_secs = hp.checkpoint_every
    ck_path, ck_config = os.path.join(hp["LOG_DIR"], f"{run_id}.ckpt"), checkpoint_config(hp, files)
    resume = ck_path if hp["RESUME"] == "auto" else hp["RESUME"]
    ck = load_checkpoint(resume, ck_config) if resume and (resume != ck_path or os.path.exists(ck_path)) else None
    if resume and ck is None:
        ctx.log(f"resume: no checkpoint at {resume}, starting at step 0")
    step_fn = make_step(hp, ctx, ddp, opts)
    warm_up(hp, ctx, model, opts, step_fn, files)
    if hp["QAT_THRESHOLD"] >= 1.0:
        model.switch(qat=True)
        ctx.log("late_qat:enabled step:0 lr_mult:1.000")
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params] if hp["EMA_DECAY"] > 0 else None
    ts = TrainState(model, opts, ema, make_loader(hp, files, ctx))
    if ck is not None:
        restore_checkpoint(ck, ts)
        ctx.log(f"resume: {resume} step:{ts.step} train_time:{ts.elapsed_ms:.0f}ms")
    train_ms, last_ms, loop_log, ck_last = ts.elapsed_ms, 0.0, 0.0, ts.elapsed_ms
    stats = torch.zeros(4, dtype=torch.float64, device=ctx.device)
    bar = ctx.progress(hp["ITERATIONS"], "train")
    bar.update(ts.step)
    stop = []

    def on_stop(sig, _):  # SIGTERM/SIGINT: checkpoint at the next step boundary (all ranks agree via stats), then exit
        stop.append(sig)
        signal.signal(sig, handlers[sig])  # a second one acts at once

    handlers = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    ctx.sync()
    t0 = time.perf_counter()
    while True:
        loss, mult = step_fn(ts.loader, ts.step, ts.elapsed_ms)  # training time so far, identical on every rank
        if ema is not None:
            ema_update(ema, params, hp["EMA_DECAY"])
        ts.step += 1
        stats[0], stats[1], stats[2] = train_ms + 1000 * (time.perf_counter() - t0), loss, (~torch.isfinite(loss)).double()
        stats[3] = float(bool(stop))
        if ctx.world > 1:
            dist.all_reduce(stats)
        ts.elapsed_ms, mean_loss, bad, stopped = (stats / ctx.world).tolist() if ctx.world > 1 else stats.tolist()
        step, elapsed = ts.step, ts.elapsed_ms
        if bad:
            raise UserError(f"non-finite training loss at step {step}; lower the learning rates or check the data")
        if loop_log:  # the step time right after a loop switch: no recompile stall if warm-up compiled every depth
            ctx.log(f"layer_loop: first_step_ms:{elapsed - last_ms:.1f} previous_step_ms:{loop_log:.1f}")
            loop_log = 0
        if update_switches(hp, ctx, ts, mult):
            loop_log = elapsed - last_ms
        last_ms = elapsed
        done = step >= hp["ITERATIONS"] or 0 < train_cap_ms(hp) <= elapsed
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
        if step % hp["TRAIN_LOG_EVERY"] == 0 or step == 1 or done:
            ctx.log(f"step:{step}/{hp['ITERATIONS']} train_loss:{mean_loss:.4f} train_time:{elapsed:.0f}ms "
                    f"step_avg:{elapsed / step:.2f}ms lr_mult:{mult:.4f}")
        if hp["VAL_LOSS_EVERY"] and (step % hp["VAL_LOSS_EVERY"] == 0 or done):
            ctx.sync()
            train_ms, t_val = elapsed, time.perf_counter()
            vl, vb, _ = evaluate(ctx, eval_forward(model, ctx.compile), val, hp.eval_len, hp.eval_len, hp["EVAL_BATCH_SEQS"], desc="val")
            model.train()
            ctx.log(f"step:{step}/{hp['ITERATIONS']} val_loss:{vl:.4f} val_bpb:{vb:.4f} train_time:{elapsed:.0f}ms "
                    f"eval_time:{1000 * (time.perf_counter() - t_val):.0f}ms")
            t0 = time.perf_counter()
        stopped = stopped and not done  # a signal at the last step: training is complete, go on
        if stopped or not done and (ck_steps and step % ck_steps == 0 or ck_secs and elapsed - ck_last >= 1000 * ck_secs):
            ck_last = elapsed  # checkpoint time counts as training time: it is wall clock inside the loop
            save_checkpoint(ctx, ck_path, ck_config, ts)
        if stopped:
            for s, h in handlers.items():
                signal.signal(s, h)
            raise UserError(f"stopped by SIGTERM/SIGINT at step {step}; continue with RUN_ID={run_id} RESUME=auto "
                            f"(same settings) from {ck_path}")
        if done:
            break
    for s, h in handlers.items():
        signal.signal(s, h)
    bar.close()
    ctx.log(f"train_done steps:{ts.step} train_time:{ts.elapsed_ms:.0f}ms step_avg:{ts.elapsed_ms / ts.step:.2f}ms"
            + (f" peak_mem_gib:{torch.cuda.max_memory_allocated() / 2**30:.2f}" if ctx.device.type == "cuda" else ""))
    model.set_qat(None)  # calibration and evaluation: the float weights, without fake-quant ops in the graph
    if ema is not None:
        with torch.no_grad():
            torch._foreach_copy_(params, ema)
    return ts


# ----------------------------------------------------------------------------- calibration
# GPTQ's input Hessians, from the training batches that follow the loop, inside the wall-clock cap.
def tree_sum(ts: list[Tensor]) -> Tensor:
    """Sum as a midpoint tree: a rank's contiguous share of the leaves is a subtree, so one all-reduce over 2 ranks
    completes the same tree as 1 rank alone, bit for bit."""
    return ts[0] if len(ts) == 1 else tree_sum(ts[:len(ts) // 2]) + tree_sum(ts[len(ts) // 2:])


@torch.no_grad()
def collect_hessians(hp: Config, ctx: Context, model: GPT, loader, budget_ms: float | None) -> tuple[dict, int, float]:
    """GPTQ calibration: H = sum of X^T X over the inputs of every matrix that ships quantized (for the tied
    embedding, the final-norm output: it is also the output layer), from up to GPTQ_CALIB_BATCHES further training
    batches run forward through `model` (the weights that will be exported). Each rank keeps one H per local
    micro-batch slot, sums its slots as a midpoint tree, then all ranks meet in one all-reduce: 1 and 2 ranks give
    bit-identical H. Stops early (after at least one batch) when the next batch would pass budget_ms (None = no
    cap). Returns (H by parameter name, batches, milliseconds including the final all-reduce)."""
    accum, L, B, device = hp["MICRO_BATCHES"] // ctx.world, hp["TRAIN_SEQ_LEN"], hp["TRAIN_BATCH_TOKENS"], ctx.device
    bits, big = quant_kinds(model), lambda p: p.numel() > hp["QUANT_MIN_NUMEL"]
    targets = {m: (f"{n}.weight", m.weight.size(1)) for n, m in model.linears() if f"{n}.weight" in bits and big(m.weight)}
    if "tok_emb.weight" in bits and big(model.tok_emb.weight):
        targets[model.final_norm] = ("tok_emb.weight", model.tok_emb.weight.size(1))
    H = {k: torch.zeros(accum, d, d, device=device) for k, d in targets.values()}
    slot, last = [0], [None, None]

    def add(key, x):
        if last[0] is not x:  # q, k and v share one input: one product
            xf = x.detach().reshape(-1, x.size(-1)).float()
            with torch.autocast(xf.device.type, enabled=False):  # fp32 inputs (TF32 matmul on CUDA), not autocast's bf16
                last[0], last[1] = x, xf.T @ xf
        H[key][slot[0]] += last[1]

    hooks = [m.register_forward_pre_hook(lambda _, a, k=k: add(k, a[0])) if isinstance(m, QLinear) else
             m.register_forward_hook(lambda _, a, out, k=k: add(k, out)) for m, (k, _) in targets.items()]
    ctx.sync()
    t0, batches, slowest, spent = time.perf_counter(), 0, 0.0, 0.0
    try:
        while batches < hp["GPTQ_CALIB_BATCHES"]:
            t = time.perf_counter()
            x, y = loader.next_batch(B, L)
            for j, (xm, ym) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
                slot[0] = j
                with ctx.autocast():
                    model(xm, ym)
            ctx.sync()
            batches += 1
            times = torch.tensor([time.perf_counter() - t0, time.perf_counter() - t], device=device) * 1000
            if ctx.world > 1:  # every rank takes the same decision
                dist.all_reduce(times, op=dist.ReduceOp.MAX)
            spent, slowest = times[0].item(), max(slowest, times[1].item())
            if budget_ms is not None and spent + slowest > budget_ms:
                break
    finally:
        for h in hooks:
            h.remove()
    flat = torch.cat([tree_sum(h).flatten() for h in H.values()])
    if ctx.world > 1:
        dist.all_reduce(flat)
    out, off = {}, 0
    for k, h in H.items():
        out[k], off = flat[off:off + h[0].numel()].view_as(h[0]), off + h[0].numel()
    ctx.sync()
    return out, batches, 1000 * (time.perf_counter() - t0)


def calibrate(hp: Config, ctx: Context, ts: TrainState) -> dict[str, Tensor]:
    """GPTQ's Hessians from training batches that follow the training stream, inside the wall-clock cap (they read
    training data); {} under QUANT_METHOD=rtn."""
    if hp["QUANT_METHOD"] != "gptq":
        return {}
    limit = 1000 * hp["MAX_WALLCLOCK_SECONDS"]
    hs, batches, ms = collect_hessians(hp, ctx, ts.model, ts.loader, limit - ts.elapsed_ms if limit > 0 else None)
    ctx.log(f"gptq_calibration: batches:{batches} tokens:{batches * hp['TRAIN_BATCH_TOKENS']} seconds:{ms / 1000:.2f} "
            f"train_plus_calibration_ms:{ts.elapsed_ms + ms:.0f} limit_ms:{limit:.0f}"
            + (" OVER: raise GPTQ_RESERVE_SECONDS" if 0 < limit < ts.elapsed_ms + ms else ""))
    return hs


# ----------------------------------------------------------------------------- artifact
# The file that ships: magic, a compressed JSON header, then one compressed blob per group of arrays of one role (all
# layers' query matrices, all MLP down-projections, the tied embedding, the fp16 scales, ...), each laid out and
# compressed in whichever way measures smallest. Written atomically by rank 0, shrunk to fit SIZE_LIMIT_BYTES if
# needed (zero int6 +-1 values, else int5 matrices), read back on every rank.
ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGOLFQZ", 4  # magic, version, header codec, u32 packed + raw header sizes, header, blobs
CODECS = ("zstd", "brotli", "lzma")  # zstd-22; brotli-11 (window 2^24); lzma (xz preset 9e, raw stream)
LAYOUTS = {"int": ("rows", "cols"), "float": ("rows", "planes")}  # cols: each matrix transposed; planes: byte planes
NP_DTYPES = {torch.int8: np.int8, torch.float16: np.float16, torch.float32: np.float32}
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def compress(codec: str, raw: bytes) -> bytes:
    if codec == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=22, write_content_size=False).compress(raw)
    if codec == "brotli":
        import brotli
        return brotli.compress(raw, quality=11, lgwin=24)
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


def decompress(codec: str, blob: bytes, size: int) -> bytes:
    """Inverse of compress; `size` is the exact raw size (an error if the stream says otherwise)."""
    if codec == "zstd":
        import zstandard
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=size)
    elif codec == "brotli":
        import brotli
        raw = brotli.decompress(blob)
    else:
        raw = lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    if len(raw) != size:
        raise ValueError("size mismatch")
    return raw


def array_specs(m: dict) -> dict[str, tuple[torch.dtype, list[int]]]:
    """The arrays an entry ships, key -> (dtype, shape), from its metadata alone: symbols and scales (and LQER's
    factors) of an intN entry, else the fp16/fp32 data."""
    shape = m["shape"]
    if not m["scheme"].startswith("int"):
        return {"data": (torch.float16 if m["scheme"] == "fp16" else torch.float32, shape)}
    specs = {"q": (torch.int8, shape), "scale": (torch.float16, shape[:1])}
    if "lqer" in m:
        r, h, g = m["lqer"], torch.float16, m.get("lqer_group")
        na, nb = ([shape[0] * r // g], [r * shape[1] // g]) if g else (shape[:1], [r])  # scales: per group or per row
        specs |= {"la": (torch.int8, [shape[0], r]), "la_s": (h, na), "la_z": (h, na),
                  "lb": (torch.int8, [r, shape[1]]), "lb_s": (h, nb), "lb_z": (h, nb)}
    return specs


def group_of(m: dict, key: str, dtype: torch.dtype) -> str:
    """Arrays of one role share a group: the symbols of one matrix kind over all layers (layer numbers dropped), LQER
    factors, then one group per float type (scales, small matrices, vectors)."""
    if key == "q":
        return f"{m['scheme']}:{'.'.join(p for p in m['name'].split('.') if not p.isdigit())}"
    return "lqer" if key in ("la", "lb") else str(dtype).removeprefix("torch.")


def group_bytes(arrays: list[Tensor], layout: str) -> bytes:
    parts = [a.detach().cpu().numpy() for a in arrays]
    raw = b"".join((p.T if layout == "cols" and p.ndim == 2 else p).tobytes() for p in parts)
    if layout == "planes":  # all first bytes of each value, then all second bytes, ...
        raw = np.frombuffer(raw, np.uint8).reshape(-1, parts[0].itemsize).T.tobytes()
    return raw


def group_arrays(raw: bytes, specs: list[tuple[torch.dtype, list[int]]], layout: str) -> list[Tensor]:
    """Inverse of group_bytes, given the arrays' (dtype, shape)."""
    if layout == "planes":
        raw = np.frombuffer(raw, np.uint8).reshape(torch.empty((), dtype=specs[0][0]).element_size(), -1).T.tobytes()
    out, off = [], 0
    for dt, shape in specs:
        n = math.prod(shape)
        a = np.frombuffer(raw, NP_DTYPES[dt], count=n, offset=off)
        a = a.reshape(shape[::-1]).T if layout == "cols" and len(shape) == 2 else a.reshape(shape)
        out.append(torch.from_numpy(np.array(a)))  # a writable copy
        off += a.nbytes
    return out


def sample_slices(raw: bytes, n: int = 16, size: int = 1 << 14) -> bytes:
    step = len(raw) // n
    return b"".join(raw[i * step:i * step + size] for i in range(n))


class Packer:
    """Writes entries into the artifact format. Each group is tried in each of its layouts with each codec, in
    parallel threads (the codecs release the GIL), and the smallest wins (ties: the first in LAYOUTS x CODECS order);
    a group over 1 MiB is tried on slices of itself first, and only the best two run in full.
    The choices and the compressed blobs are remembered: the budget fit's repacks keep each group's choice and
    recompress only the groups that changed."""

    def __init__(self, workers: int | None = None):
        self.plan, self.blobs, self.workers = {}, {}, workers or os.cpu_count() or 1
        self.seconds = dict(layout=0.0, compress=0.0)

    def __call__(self, entries: list[dict], config: dict) -> bytes:
        from concurrent.futures import ThreadPoolExecutor
        metas, members = [], {}
        for i, e in enumerate(entries):
            m = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in e.items() if not torch.is_tensor(v)}
            for key, (dt, _) in array_specs(m).items():
                members.setdefault(group_of(m, key, dt), []).append((i, key))
            metas.append(m)
        cands, raws, t0 = {}, {}, time.perf_counter()
        for g, mem in sorted(members.items()):
            arrays = [entries[i][k] for i, k in mem]
            kind = "int" if arrays[0].dtype == torch.int8 else "float"
            cands[g] = [self.plan[g]] if g in self.plan else [(lay, c) for lay in LAYOUTS[kind] for c in CODECS]
            for lay in dict.fromkeys(lay for lay, _ in cands[g]):
                raw = group_bytes(arrays, lay)
                raws[g, lay] = raw, hashlib.sha256(raw).digest()
        t1 = time.perf_counter()
        with ThreadPoolExecutor(self.workers) as pool:
            # a group over 1 MiB: every layout x codec on 16 evenly spaced 16 KiB slices; the best 2 then run in full
            big = [(g, lay, c) for g in cands if len(cands[g]) > 2 and len(raws[g, cands[g][0][0]][0]) > 1 << 20
                   for lay, c in cands[g]]
            sizes = pool.map(lambda j: len(compress(j[2], sample_slices(raws[j[0], j[1]][0]))), big)
            ranked = {}
            for (g, lay, c), n in zip(big, sizes):
                ranked.setdefault(g, []).append((n, cands[g].index((lay, c)), (lay, c)))
            for g, r in ranked.items():
                cands[g] = [lc for _, _, lc in sorted(r)[:2]]
            jobs = {(lay, c, raws[g, lay][1]): raws[g, lay][0] for g in cands for lay, c in cands[g]}
            jobs = {k: v for k, v in jobs.items() if k not in self.blobs}
            self.blobs |= dict(zip(jobs, pool.map(lambda k: compress(k[1], jobs[k]), jobs)))
        self.seconds["layout"] += t1 - t0
        self.seconds["compress"] += time.perf_counter() - t1
        groups, chunks, check, self.sizes = [], [], hashlib.sha256(), {}
        for g, mem in sorted(members.items()):
            self.plan[g] = lay, c = min(cands[g], key=lambda lc: len(self.blobs[lc[0], lc[1], raws[g, lc[0]][1]]))
            chunks.append(self.blobs[lay, c, raws[g, lay][1]])
            self.sizes[g] = len(chunks[-1])
            check.update(raws[g, lay][0])
            groups.append([g, lay, c, len(chunks[-1]), [list(x) for x in mem]])
        header = dict(config=config, tensors=metas, groups=groups)
        check.update(json.dumps(header, separators=(",", ":")).encode())  # the checksum covers the header too
        header = json.dumps(header | dict(sha256=check.hexdigest()), separators=(",", ":")).encode()
        c, hblob = min(((c, compress(c, header)) for c in CODECS), key=lambda x: len(x[1]))
        out = (ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION, CODECS.index(c)]) + struct.pack("<II", len(hblob), len(header))
               + hblob + b"".join(chunks))
        self.total = len(out)
        return out


def pack_artifact(entries: list[dict], config: dict) -> bytes:
    return Packer()(entries, config)


def unpack_artifact(blob: bytes, path: str = "artifact") -> tuple[dict, list[dict]]:
    """Parse and verify an artifact: anything truncated, altered, foreign or of another format is refused with one
    line. Returns the header (config, tensors, groups) and the entries with their arrays."""
    if not blob.startswith(ARTIFACT_MAGIC):
        raise UserError(f"{path} is not an artifact written by train_gpt.py (bad magic)")
    version = blob[len(ARTIFACT_MAGIC)] if len(blob) > len(ARTIFACT_MAGIC) else None
    if version != ARTIFACT_VERSION:
        raise UserError(f"{path} has artifact format {3 if version == 1 else version}; this train_gpt.py reads format "
                        f"{ARTIFACT_VERSION}: score it with the train_gpt.py that wrote it (the top of its log), or re-export")
    bad = f"{path} is corrupted or truncated"
    try:
        off = len(ARTIFACT_MAGIC) + 10
        codec, (n, size) = CODECS[blob[off - 9]], struct.unpack_from("<II", blob, off - 8)
        meta = json.loads(decompress(codec, blob[off:off + n], size))
        off += n
        entries = [dict(m) for m in meta["tensors"]]
        specs = [array_specs(m) for m in entries]
        sizes = [g[3] for g in meta["groups"]]
    except Exception:  # any failure to parse the header: the codecs' own error types included
        raise UserError(f"{bad} (unreadable header); re-export or re-download it") from None
    if off + sum(sizes) != len(blob):
        raise UserError(f"{bad} ({len(blob)} bytes where its header accounts for {off + sum(sizes)}); re-export or re-download it")
    check, g = hashlib.sha256(), "?"
    try:
        for g, layout, codec, n, mem in meta["groups"]:
            sp = [specs[i][k] for i, k in mem]
            raw = decompress(codec, blob[off:off + n], sum(math.prod(s) * torch.empty((), dtype=d).element_size() for d, s in sp))
            check.update(raw)
            for (i, k), a in zip(mem, group_arrays(raw, sp, layout)):
                entries[i][k] = a
            off += n
    except Exception:
        raise UserError(f"{bad} (group {g} does not decompress); re-export or re-download it") from None
    check.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, separators=(",", ":")).encode())
    if check.hexdigest() != meta["sha256"] or any(k not in e for e, sp in zip(entries, specs) for k in sp):
        raise UserError(f"{path} is corrupted (checksum mismatch or missing arrays)")
    return meta, entries


def dequantize(entries: list[dict]) -> dict[str, Tensor]:
    """The float weights the artifact stands for: symbols x scales (+ the LQER correction), else the stored data."""
    out = {}
    for e in entries:
        if "q" not in e:
            out[e["name"]] = e["data"].float()
        else:
            out[e["name"]] = e["q"].float() * e["scale"].float()[:, None] + (lqer_product(e) if "lqer" in e else 0.0)
    return out


def fit_int5(entries, originals, config: dict, hp: Config, *, code_bytes: int, limit: int, log, hessians: dict, before: int,
             pack: Packer) -> bytes:
    """Requantize int6 matrices to int5 (same scale rule; GPTQ again, at 5 bits, where there is a Hessian; their LQER
    correction, if any, is dropped) in order of added squared error per byte saved (order-0 entropy estimate), and
    keep the fewest that fit, by bisection on the real compressed size (which falls with the count, up to a few
    hundred bytes of codec noise). Raises UserError if even all of them do not fit."""
    cand = []
    for i, e in enumerate(entries):
        if e.get("scheme") == "int6":
            w = originals[e["name"]]
            f5 = quant_fields(w, 5, hp, hessians.get(e["name"]), name=e["name"])
            e5 = {k: v for k, v in e.items() if k not in ("lqer", "lqer_group", "la", "la_s", "la_z", "lb", "lb_s", "lb_z")}
            e5 |= {k: v.cpu() if torch.is_tensor(v) else v for k, v in f5.items()}
            saved = max(entropy_bytes([e]) - entropy_bytes([e5]), 1)
            cand.append(((e5["mse"] - e["mse"]) * w.numel() / saved, i, e5))
    cand.sort(key=lambda c: c[:2])

    def build(k):
        out = list(entries)
        for _, i, e5 in cand[:k]:
            out[i] = e5
        return pack(out, config)

    lo, hi, target = 0, len(cand), limit - code_bytes  # lo does not fit; hi must
    best = build(hi)
    if len(best) > target:
        raise UserError(f"artifact cannot fit: {before} + {code_bytes} code bytes > SIZE_LIMIT_BYTES={limit} even with "
                        f"all {hi} int6 matrices in int5 ({len(best)} bytes); use a smaller model")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        blob = build(mid)
        if len(blob) <= target:
            hi, best = mid, blob
        else:
            lo = mid
    log(f"budget_fit: moved {hi} of {len(cand)} int6 matrices to int5 instead of zeroing values of magnitude 1 (not "
        f"enough), least added squared error per byte first (trained for int6: expect a larger penalty): "
        f"{','.join(e5['name'] for _, _, e5 in cand[:hi])} bytes_before:{before + code_bytes} bytes_after:{len(best) + code_bytes}")
    return best


def fit_budget(entries, originals, config: dict, hp: Config, *, code_bytes: int, limit: int, log, hessians=None,
               pack: Packer | None = None) -> bytes:
    """Pack; if code + artifact exceeds the limit, zero the int6 values of magnitude 1 whose removal adds the
    least squared error, in that order, choosing the count on a model of each group's packed size (a ratio times its
    order-0 entropy) refined by real packs until one fits within 0.02 % of the limit (at most 6); if
    zeroing all of them is not enough, move whole int6 matrices to int5 instead (fit_int5). Deterministic; raises
    UserError if nothing fits."""
    pack = pack or Packer()
    blob = pack(entries, config)
    before = len(blob)
    if before + code_bytes <= limit:
        return blob
    entries = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in e.items()} for e in entries]
    ids, flat_idx, cost = [], [], []
    for i, e in enumerate(entries):
        if e.get("scheme") == "int6":
            q = e["q"].flatten()
            idx = (q.abs() == 1).nonzero().flatten()
            w = originals[e["name"]].cpu().flatten()[idx]
            s = e["scale"].float().repeat_interleave(e["q"].size(1))[idx]
            cost.append(w.square() - (w - q[idx].float() * s).square())
            ids.append(torch.full_like(idx, i))
            flat_idx.append(idx)
    if not cost:
        raise UserError(f"artifact {before} + code {code_bytes} bytes exceeds SIZE_LIMIT_BYTES={limit} and has no int6 values to drop")
    cost, ids, flat_idx = torch.cat(cost), torch.cat(ids), torch.cat(flat_idx)
    order = torch.sort(cost, stable=True).indices
    ids, flat_idx, n = ids[order], flat_idx[order], len(order)

    def build(k):
        out = [dict(e) for e in entries]
        for i in ids[:k].unique().tolist():
            q = out[i]["q"].clone().flatten()
            q[flat_idx[:k][ids[:k] == i]] = 0
            out[i]["q"] = q.view(entries[i]["q"].shape)
        return pack(out, config)

    target = limit - code_bytes
    best = build(n)
    if len(best) > target:
        return fit_int5(entries, originals, config, hp, code_bytes=code_bytes, limit=limit, log=log, hessians=hessians or {},
                        before=before, pack=pack)
    # The count k: each int6 group's size is modelled as ratio x its order-0 entropy (cheap for any k: zeroing only
    # moves counts from +-1 to 0), the ratio measured on the last real pack; the smallest k the model says fits is
    # packed for real, the ratios re-measured, until a real pack fits within 0.02 % of the target.
    names = sorted({group_of(entries[i], "q", torch.int8) for i in ids.unique().tolist()})
    col = {i: names.index(group_of(entries[i], "q", torch.int8)) for i in ids.unique().tolist()}
    lut = torch.zeros(len(entries), dtype=torch.long)
    lut[list(col)] = torch.tensor(list(col.values()))
    grp = lut[ids]  # each candidate's group index (millions of values at full size: no Python loop)
    hist = torch.zeros(len(names), 256, dtype=torch.float64)
    for i, j in col.items():
        hist[j] += torch.bincount(entries[i]["q"].flatten().long() + 128, minlength=256).double()
    sign = torch.empty(n, dtype=torch.long)
    for i in col:
        sel = ids == i
        sign[sel] = (entries[i]["q"].flatten()[flat_idx[sel]] > 0).long()

    def bits(k):  # order-0 entropy of each group, in bytes, after zeroing the first k
        d = torch.zeros(len(names), 2, dtype=torch.float64).index_put_((grp[:k], sign[:k]), torch.ones(k, dtype=torch.float64), accumulate=True)
        h = hist.clone()
        h[:, 127] -= d[:, 0]
        h[:, 129] -= d[:, 1]
        h[:, 128] += d.sum(1)
        return -(h * torch.log2(h / h.sum(1, keepdim=True))).nan_to_num().sum(1) / 8

    def measure(k):
        real = torch.tensor([float(pack.sizes[g]) for g in names], dtype=torch.float64)
        return real / bits(k).clamp_min(1), pack.total - float(real.sum())

    lo, hi = 0, n  # lo does not fit, hi fits
    ratio, fixed = measure(n)
    for _ in range(6):
        a, b = lo + 1, hi  # the smallest k in (lo, hi] whose modelled size fits
        while a < b:
            mid = (a + b) // 2
            a, b = (mid + 1, b) if fixed + float((ratio * bits(mid)).sum()) > target else (a, mid)
        if a >= hi:
            break
        blob_k = build(a)
        if len(blob_k) <= target:
            hi, best = a, blob_k
            if target - len(blob_k) <= max(256, 2e-4 * target):
                break
        else:
            lo = a
        ratio, fixed = measure(a)
    log(f"budget_fit: zeroed {hi} of {n} int6 values of magnitude 1 (least squared error first) "
        f"bytes_before:{before + code_bytes} bytes_after:{len(best) + code_bytes}")
    return best


def export(hp: Config, ctx: Context, model: GPT, hessians: dict, code_bytes: int, path: str, forecast=None) -> dict:
    """Quantize the model (GPTQ with `hessians`, else RTN), add LQER corrections, fit code + artifact under
    SIZE_LIMIT_BYTES and write the artifact atomically, on rank 0; logs each phase's time, each group's layout, codec
    and bytes, and the error of the size forecast (a Future of forecast()); returns its byte counts (on rank 0)."""
    def go():
        t0, tf32 = time.perf_counter(), torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # GPTQ's error feedback in true fp32 (start_distributed turns TF32 on)
        try:
            entries, originals = quantize_state(model.state_dict(), quant_kinds(model), hp, hessians)
            t1 = time.perf_counter()
            ctx.log(f"quantized: method:{hp['QUANT_METHOD']} scale:{hp['QUANT_SCALE']} seconds:{t1 - t0:.1f}")
            entries = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in e.items()} for e in entries]
            originals = {k: v.cpu() for k, v in originals.items()}
            if hp["LQER_RANK"]:
                ctx.log(add_lqer(entries, originals, {k: v.cpu() for k, v in hessians.items()}, hp))
            t2, pack = time.perf_counter(), Packer()
            blob = fit_budget(entries, originals, model.stored_config(), hp, code_bytes=code_bytes,
                              limit=hp["SIZE_LIMIT_BYTES"], log=ctx.log, hessians=hessians, pack=pack)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        write_atomic(path, blob, "artifact")
        total, t3 = len(blob) + code_bytes, time.perf_counter()
        ctx.log("artifact_groups: " + " ".join(f"{g}={lay}/{c}/{n}" for g, lay, c, n, _ in unpack_artifact(blob, path)[0]["groups"]))
        ctx.log(f"export_seconds: quantize:{t1 - t0:.1f} lqer:{t2 - t1:.1f} layout:{pack.seconds['layout']:.1f} "
                f"compress:{pack.seconds['compress']:.1f} total:{t3 - t0:.1f}")
        ctx.log(f"artifact: path={path} bytes={len(blob)} export_seconds:{t3 - t0:.1f}")
        ctx.log(f"code_bytes:{code_bytes}")
        ctx.log(f"total_submission_bytes:{total} limit:{hp['SIZE_LIMIT_BYTES']} {'ok' if total <= hp['SIZE_LIMIT_BYTES'] else 'OVER'}")
        if forecast is not None:
            f = forecast.result()
            ctx.log(f"size_forecast_error: forecast:{f} final:{total} error:{100 * (f - total) / total:+.2f}%")
        return dict(artifact_bytes=len(blob), code_bytes=code_bytes, total_bytes=total)
    return ctx.on_rank0(go) or {}


def read_artifact(path: str) -> tuple[dict, list[dict], int]:
    """(metadata, entries, file bytes) of the artifact at `path`, verified."""
    blob = read_file(path, "artifact")
    meta, entries = unpack_artifact(blob, path)
    missing = [k for k in ARCH_KEYS + ["LOOP_ACTIVE"] if k not in meta["config"]]
    if missing:
        raise UserError(f"{path} was written by an older train_gpt.py (its configuration lacks {', '.join(missing)}): "
                        f"score it with the train_gpt.py that wrote it (the top of its log), or re-export")
    return meta, entries, len(blob)


def load_artifact_model(path: str, device, attn: str = "sdpa") -> tuple[GPT, dict, int]:
    """The model rebuilt from the file alone: its architecture and loop depth from the metadata, weights dequantized;
    `attn`: the attention kernel."""
    meta, entries, size = read_artifact(path)
    model = GPT(meta["config"])
    model.attn_kernel = attn
    model.switch(loops=meta["config"]["LOOP_ACTIVE"])
    model = model.to(device)
    try:
        model.load_state_dict(dequantize(entries))
    except RuntimeError:
        raise UserError(f"{path} does not match the architecture in its own metadata") from None
    return model, meta, size


# ----------------------------------------------------------------------------- test-time training
# Legal score-first TTT on the round-tripped model: TTT=chunk (SGD on each scored chunk of the stream) and TTT=doc
# (per-document LoRA, optionally phases of SGD on the documents already scored).
def chunk_windows(n: int, L: int, stride: int, C: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """window_plan's windows grouped by TTT chunk, chunk c holding targets c*C..(c+1)*C-1 (there is no target 0); a
    window whose scored targets straddle a boundary is split there. Per chunk (starts, lo, hi) for eval_sums."""
    starts, score = window_plan(n, L, stride)
    first, last = starts + L - score + 1, starts + L  # scored targets of each window; both increase
    out = []
    for c in range((n - 1) // C + 1):
        a, b = max(c * C, 1), min((c + 1) * C - 1, n - 1)
        i, j = int(torch.searchsorted(last, a)), int(torch.searchsorted(first, b, right=True))
        s = starts[i:j]
        out.append((s, first[i:j].clamp(min=a) - s - 1, last[i:j].clamp(max=b) - s))
    return out


def ttt_grad(hp: Config, ctx: Context, model: GPT, tokens: Tensor, a: int, b: int) -> None:
    """Each parameter's .grad := the gradient of the mean loss over targets a..b, cut into sequences of TRAIN_SEQ_LEN
    targets (the last one shorter) in MICRO_BATCHES contiguous slots, rank r taking slots [rK/W, (r+1)K/W),
    EVAL_BATCH_SEQS sequences per pass. Each slot's gradient is kept apart, then the slots are summed as a tree
    (tree_sum, then one all-reduce), so 1 and 2 ranks give bit-identical gradients."""
    L, K, batch, device, n_tgt = hp["TRAIN_SEQ_LEN"], hp["MICRO_BATCHES"], hp["EVAL_BATCH_SEQS"], tokens.device, b - a + 1
    params, edges = list(model.parameters()), [-(-n_tgt // L) * k // K for k in range(K + 1)]
    slots, per = [], K // ctx.world
    for k in range(ctx.rank * per, (ctx.rank + 1) * per):
        model.zero_grad(set_to_none=True)
        seqs = torch.arange(edges[k], edges[k + 1], device=device)
        for i in range(0, len(seqs), batch):
            t0 = a + L * seqs[i:i + batch]
            for t, m in ((t0[t0 + L <= b + 1], L), (t0[t0 + L > b + 1], n_tgt % L)):
                if len(t):
                    tok = tokens[(t - 1)[:, None] + torch.arange(m + 1, device=device)].long()
                    with ctx.autocast():
                        loss = model(tok[:, :-1], tok[:, 1:], per_token=True).sum() / n_tgt
                    loss.backward()
        slots.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]))
    flat = tree_sum(slots)
    if ctx.world > 1:
        dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def ttt_sgd(hp: Config, ctx: Context, model: GPT, opt, tokens: Tensor, a: int, b: int, *, t: float) -> None:
    """TTT_EPOCHS SGD steps on the mean loss of targets a..b, all ranks together, at TTT_LR cosine-decayed to
    t in [0, 1] of the way through the stretches trained on, the gradient's norm clipped to TTT_GRAD_CLIP."""
    for g in opt.param_groups:
        g["lr"] = hp["TTT_LR"] * 0.5 * (1 + math.cos(math.pi * t))
    for _ in range(hp["TTT_EPOCHS"]):
        ttt_grad(hp, ctx, model, tokens, a, b)
        if hp["TTT_GRAD_CLIP"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["TTT_GRAD_CLIP"], foreach=True)
        opt.step()
    model.zero_grad(set_to_none=True)


def ttt_chunk(hp: Config, ctx: Context, model: GPT, fwd, val: Validation, out: Tensor | None = None):
    """Legal score-first TTT, chunk by chunk: score every target of the chunk with the current
    weights (sliding windows, EVAL_STRIDE), then take TTT_EPOCHS SGD steps on exactly those targets; every rank
    keeps the same weights; the last chunk is never trained on. A score thus depends only on the tokens before it:
    the weights on the chunks before, the window on causal attention. Returns (val_loss, val_bpb, scored tokens)."""
    L, C = hp.eval_len, hp["TTT_CHUNK_TOKENS"]
    stride = min(hp["EVAL_STRIDE"], L) or L
    chunks = chunk_windows(len(val.tokens), L, stride, C)
    opt = torch.optim.SGD(model.parameters(), lr=hp["TTT_LR"], momentum=hp["TTT_MOMENTUM"])
    sums = torch.zeros(3, dtype=torch.float64, device=val.tokens.device)
    for c, windows in enumerate(chunks):
        sums += eval_sums(ctx, fwd, val, L, stride, hp["EVAL_BATCH_SEQS"], desc=f"ttt {c + 1}/{len(chunks)}",
                          windows=windows, out=out)
        if c < len(chunks) - 1:
            ttt_sgd(hp, ctx, model, opt, val.tokens, max(c * C, 1), (c + 1) * C - 1, t=c / (len(chunks) - 1))
    return metrics(ctx, sums)


def ttt_doc(hp: Config, ctx: Context, model: GPT, val: Validation, out: Tensor | None = None):
    """Legal per-document LoRA TTT: document d (BOS to BOS; it also scores the next BOS) is scored TTT_DOC_CHUNK
    targets at a time, in a window of at most EVAL_SEQ_LEN that never starts before its BOS, with its own fresh adapter
    (on every linear layer, and the logits with TTT_LORA_HEAD), which then takes one AdamW step on those targets. Rows
    of a batch are documents of similar length, padded to a length set by the step alone, so a score depends only on
    its document's earlier tokens and on the base weights. Those change only with TTT_DOC_PHASES = P > 0: the first
    TTT_PREFIX_DOCS documents are scored in P phases, each followed by SGD (chunk's, over TTT_CHUNK_TOKENS pieces) on
    every document scored so far; the rest are scored with the final weights. Returns (val_loss, val_bpb, tokens)."""
    tokens = val.tokens
    L, c, nb, r, n, device = hp.eval_len, hp["TTT_DOC_CHUNK"], hp["TTT_DOC_BATCH"], hp["TTT_LORA_RANK"], len(tokens), tokens.device
    if c > L:
        raise UserError(f"TTT_DOC_CHUNK={c} must be at most the evaluation window {L}")
    starts = sorted({0} | set((tokens[:-1] == BOS_ID).nonzero().flatten().tolist()))
    docs, P = list(zip(starts, starts[1:] + [n - 1])), hp["TTT_DOC_PHASES"]  # document = targets start+1..end
    cuts = [min(hp["TTT_PREFIX_DOCS"], len(docs)) * (p + 1) // P for p in range(P)]
    phases = [docs[i:j] for i, j in zip([0] + cuts, cuts + [len(docs)])]  # P prefix phases, then the rest
    targets = [m for _, m in model.linears()] + ([model] if hp["TTT_LORA_HEAD"] else [])  # each gets a .lora
    g = torch.Generator().manual_seed(hp["SEED"])  # one A for every document, on any rank
    dims = [(model.tok_emb if m is model else m).weight.shape[::-1] for m in targets]  # (in, out); the head: the tied table
    a0 = [(torch.randn(r, d, generator=g) / math.sqrt(d)).to(device) for d, _ in dims]
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for ph, phase in enumerate(phases):
        mine = sorted(phase, key=lambda d: (d[1] - d[0], d[0]))[ctx.rank::ctx.world]  # like lengths batch together, even ranks
        model.requires_grad_(False)
        doc_mask = model.sw.doc_mask
        model.switch(doc_mask=False)  # no window holds an earlier document: causal attention suffices
        for i in range(0, len(mine), nb):
            batch = mine[i:i + nb] + [(0, 0)] * (nb - len(mine[i:i + nb]))  # padding rows score nothing
            s0, e = torch.tensor(batch, device=device).T
            adapters = []
            for m, a, (_, d_out) in zip(targets, a0, dims):  # B = 0: each adapter starts as the identity
                lora = (a.expand(nb, -1, -1).clone().requires_grad_(), torch.zeros(nb, d_out, r, device=device, requires_grad=True))
                adapters += lora
                m.lora = (*lora, hp["TTT_LORA_SCALE"])
            opt = torch.optim.AdamW(adapters, lr=hp["TTT_LORA_LR"], betas=tuple(num_list(hp, "TTT_LORA_BETAS", float)),
                                    weight_decay=hp["TTT_LORA_WD"])
            for k in range(-(-int((e - s0).max()) // c)):
                first, T = s0 + 1 + k * c, min((k + 1) * c, L)
                last = torch.minimum(first + c - 1, e)
                w0 = s0 + max(0, (k + 1) * c - T)  # set by the step alone: never by where the document ends
                tok = tokens[(w0[:, None] + torch.arange(T + 1, device=device)).clamp(max=n - 1)].long()
                x, y = tok[:, :-1], tok[:, 1:]
                tgt = w0[:, None] + 1 + torch.arange(T, device=device)
                mask = (tgt >= first[:, None]) & (tgt <= last[:, None])
                with ctx.autocast():
                    nll = model(x, y, per_token=True)
                sums += score_sums(nll.detach(), x, y, mask, val.luts, val.bytes_at(tgt.clamp(max=n - 1)))
                if out is not None:
                    out[tgt[mask]] = nll.detach()[mask].double()
                ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        for m in targets:
            m.lora = None
        model.requires_grad_(True)
        model.switch(doc_mask=doc_mask)
        if ph < P and phase and any(phases[ph + 1:]):  # every rank has scored its share: SGD on all documents so far
            sgd, C, end = torch.optim.SGD(model.parameters(), lr=hp["TTT_LR"], momentum=hp["TTT_MOMENTUM"]), hp["TTT_CHUNK_TOKENS"], phase[-1][1]
            pieces = [(a, min(a + C - 1, end)) for a in range(1, end + 1, C)]
            for j, (a, b) in enumerate(pieces):
                ttt_sgd(hp, ctx, model, sgd, tokens, a, b, t=j / len(pieces))
            ctx.log(f"ttt_phase: {ph + 1}/{P} documents_scored:{cuts[ph]} sgd_targets:{end} sgd_steps:{len(pieces) * hp['TTT_EPOCHS']}")
    return metrics(ctx, sums)


# ----------------------------------------------------------------------------- entry point
def log_run_header(hp: Config, ctx: Context, run_id: str) -> int:
    """The script itself, byte for byte, then versions, device and every setting (under EVAL_ONLY, the artifact's
    configuration too); returns the script's size."""
    script = os.path.abspath(__file__)
    code = read_file(script, "script")
    ctx.log(CODE_HEAD.format(name=os.path.basename(script), n=len(code), sha=hashlib.sha256(code).hexdigest()), console=False)
    ctx.log(code.decode("utf-8"), console=False)
    ctx.log(CODE_END, console=False)
    ctx.log(f"python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
            f"device:{torch.cuda.get_device_name(ctx.device) if ctx.device.type == 'cuda' else platform.processor() or 'cpu'} "
            f"world_size:{ctx.world} cuda:{torch.version.cuda}")
    ctx.log(f"run_id:{run_id}")
    for k, v in hp.items():
        ctx.log(f"{k.lower()}:{v}", console=False)
    if hp["EVAL_ONLY"]:
        config = read_artifact(hp["ARTIFACT"])[0]["config"]
        ctx.log(f"eval_only artifact:{hp['ARTIFACT']} config:{json.dumps(config, separators=(',', ':'))}")
    return len(code)


def timed(fn, *args, **kw):
    """fn(*args, **kw)'s tuple with the seconds it took appended."""
    t0 = time.perf_counter()
    return *fn(*args, **kw), time.perf_counter() - t0


def pre_quant_score(hp: Config, ctx: Context, model: GPT, val: Validation) -> dict:
    """The trained (EMA) weights before quantization, for the penalty the artifact costs; never the submission."""
    loss, bpb, _ = evaluate(ctx, eval_forward(model, ctx.compile), val, hp.eval_len, hp.eval_len, hp["EVAL_BATCH_SEQS"],
                            desc="pre-quant eval")
    ctx.log(f"pre_quant_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    return dict(pre_quant_loss=loss, pre_quant_bpb=bpb)


def roundtrip_score(hp: Config, ctx: Context, fwd, val: Validation) -> dict:
    """Non-overlapping windows of EVAL_SEQ_LEN over the whole split: the standard score of the artifact."""
    L = hp.eval_len
    loss, bpb, n, dt = timed(evaluate, ctx, fwd, val, L, L, hp["EVAL_BATCH_SEQS"], desc="roundtrip eval")
    ctx.log(f"final_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f} tokens:{n} eval_seconds:{dt:.2f}")
    return dict(roundtrip_loss=loss, roundtrip_bpb=bpb)


def sliding_score(hp: Config, ctx: Context, fwd, val: Validation) -> dict:
    """Windows every EVAL_STRIDE tokens, each scoring only its last EVAL_STRIDE targets: every target with long context."""
    L, stride, full = hp.eval_len, hp["EVAL_STRIDE"], val.full_tokens
    loss, bpb, n, dt = timed(evaluate, ctx, fwd, val, L, stride, hp["EVAL_BATCH_SEQS"], desc="sliding eval")
    ctx.log(f"final_sliding_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f} stride:{stride} seq_len:{L} eval_seconds:{dt:.2f}")
    ctx.log(f"sliding_eval tokens:{n} tokens_per_s:{n / dt:.0f} full_split_tokens:{full} "
            f"full_split_estimate_s:{dt * (full - 1) / n:.1f}")
    return dict(sliding_loss=loss, sliding_bpb=bpb)


def ttt_score(hp: Config, ctx: Context, model: GPT, val: Validation) -> dict:
    """Legal test-time training (TTT=chunk or doc) on `model`, which it changes: give it a fresh copy."""
    if hp["TTT"] == "chunk":
        loss, bpb, n, dt = timed(ttt_chunk, hp, ctx, model, eval_forward(model, ctx.compile), val)
    else:
        loss, bpb, n, dt = timed(ttt_doc, hp, ctx, model, val)
    ctx.log(f"final_ttt_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f} protocol:{hp['TTT']} eval_seconds:{dt:.2f}")
    est, full = dt * (val.full_tokens - 1) / n, val.full_tokens
    ctx.log(f"ttt_eval tokens:{n} tokens_per_s:{n / dt:.0f} full_split_tokens:{full} full_split_estimate_s:{est:.1f} "
            f"full_split_8gpu_estimate_s:{est * ctx.world / 8:.1f}")
    return dict(ttt_loss=loss, ttt_bpb=bpb)


def run(hp: Config, ctx: Context, run_id: str) -> dict:
    """The submission, from configuration to score; returns what it measured (and the models) to callers and tests."""
    code_bytes = log_run_header(hp, ctx, run_id)                  # the script, versions, every setting
    torch.manual_seed(hp["SEED"])
    np.random.seed(hp["SEED"])
    path = hp["ARTIFACT"] or os.path.join(hp["LOG_DIR"], f"{run_id}.ptz")
    out = dict(run_id=run_id, artifact=path)
    val = load_validation(hp, ctx.device)                         # validation tokens and their byte counts
    if not hp["EVAL_ONLY"]:
        ts = train(hp, ctx, val, run_id)                          # trained weights (EMA) and where the data stream is
        hessians = calibrate(hp, ctx, ts)                         # GPTQ input Hessians, inside the training cap
        out |= pre_quant_score(hp, ctx, ts.model, val)
        out |= export(hp, ctx, ts.model, hessians, code_bytes, path, ts.size_forecast)  # quantize, fit the cap, write
        out |= dict(model=ts.model, hessians=hessians, steps=ts.step, train_ms=ts.elapsed_ms, qat_enabled=ts.model.sw.qat,
                    model_params=sum(p.numel() for p in ts.model.parameters()))
    rt, _, _ = load_artifact_model(path, ctx.device, ctx.attn)   # round trip: every rank rebuilds it from the file
    out["roundtrip_model"], fwd = rt, eval_forward(rt, ctx.compile)
    out |= roundtrip_score(hp, ctx, fwd, val)
    if 0 < hp["EVAL_STRIDE"] < hp.eval_len:
        out |= sliding_score(hp, ctx, fwd, val)
    if hp["TTT"] != "off":
        out |= ttt_score(hp, ctx, load_artifact_model(path, ctx.device, ctx.attn)[0], val)  # a fresh copy: TTT changes weights
    return out


def main(env=None) -> dict:
    """Join the ranks, resolve the configuration, open the log, then (under EVAL_ONLY with the artifact's
    architecture) run(); a UserError is logged and re-raised."""
    rank, world, device = start_distributed()
    hp = resolve_config(env, world)
    run_id = hp["RUN_ID"] or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    if world > 1:
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        run_id = box[0]
    use_compile = hp["COMPILE"] == 1 or (hp["COMPILE"] == -1 and device.type == "cuda")
    ctx = Context(rank, world, device, amp_dtype(hp, device), use_compile, Logger(rank), attn_backend(hp["ATTN"], device))
    ctx.on_rank0(lambda: ctx.log.open(os.path.join(hp["LOG_DIR"], f"{run_id}.txt")))
    try:
        if hp["EVAL_ONLY"]:  # the architecture is the artifact's, whatever the environment says
            hp = resolve_config(env, world, stored_arch=read_artifact(hp["ARTIFACT"])[0]["config"])
        return run(hp, ctx, run_id)
    except UserError as e:
        ctx.log(f"error: {e}", console=False)
        raise


if __name__ == "__main__":
    try:
        main()
        if dist.is_initialized():
            dist.barrier()  # ranks leave together: a gloo rank whose peer already tore down can abort at exit
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
