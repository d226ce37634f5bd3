"""The end-to-end pipeline, its configuration, its artifact and its bad-input messages."""
import copy
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import ROOT, metric, run_script

FINAL_LINES = ["model_params:", "pre_quant_exact val_loss:", "artifact: path=", "code_bytes:", "total_submission_bytes:",
               "final_roundtrip_exact val_loss:", "final_sliding_exact val_loss:"]


def test_smoke_prints_every_final_line_once(smoke):
    lines = smoke["log"].split("\n==== end of code ====\n", 1)[1].splitlines()
    for prefix in FINAL_LINES:
        assert sum(l.startswith(prefix) for l in lines) == 1, prefix
    total = next(l for l in lines if l.startswith("total_submission_bytes:"))
    assert total.endswith(" ok") and "limit:16000000" in total
    code = (ROOT / "train_gpt.py").read_bytes()
    assert f"code_bytes:{len(code)}" in lines
    size = smoke["artifact"].stat().st_size
    assert f"bytes={size}" in next(l for l in lines if l.startswith("artifact: path="))
    assert int(total.split()[0].split(":")[1]) == size + len(code)
    # the log starts with the exact code, then every hyperparameter as name:value
    assert smoke["log"].split("\n", 1)[1].startswith(code.decode())
    for name, _, _ in T.HPARAMS:
        assert any(l.startswith(f"{name.lower()}:") for l in lines), name


@pytest.mark.parametrize("preset,precision", [(p, {}) for p in T.PRESETS] + [("record", {"AUTOCAST": "bf16"}),
                                                                              ("frontier", {"MUON_BATCHED": 1})],
                         ids=list(T.PRESETS) + ["record-bf16", "frontier-muon-batched"])
def test_two_processes_match_one(preset, precision, sample_data, tmp_path):
    """Same global batch on 1 and 2 gloo ranks. With one thread per process (as torchrun sets) every micro-batch runs
    the same kernels, g1/2 + g2/2 == (g1 + g2)/2 exactly, and the Muon all-reduce adds only zeros to each slot, so
    the weights must be bit-identical: any slip in the distributed optimizer or loader shows. GPTQ's Hessians (one
    per micro-batch slot, a midpoint tree, one all-reduce) and so the artifacts must be bit-identical too. Every
    preset (frontier: its loops switch on mid-run), and EVAL_ONLY on the artifact gives the same round trip. With
    AUTOCAST=bf16 the same holds for the GPU's dtype path: bf16 autocast, bf16 Newton-Schulz, bf16 all-reduce."""
    env = dict(PRESET=preset, ITERATIONS=12, WARMDOWN_ITERS=6, EVAL_STRIDE=0, VAL_MAX_TOKENS=4096, EMA_DECAY=0.8,
               OMP_NUM_THREADS=1, QUANT_METHOD="gptq", GPTQ_CALIB_BATCHES=2, **precision)
    one, two = tmp_path / "one", tmp_path / "two"
    rc1, _, err1, log1 = run_script(env | {"LOG_DIR": one}, one, script="tests/dist_worker.py")
    rc2, _, err2, log2 = run_script(env | {"LOG_DIR": two}, two, nproc=2, script="tests/dist_worker.py")
    assert rc1 == 0, err1[-2000:]
    assert rc2 == 0, err2[-2000:]
    w1 = torch.load(one / "weights_rank0.pt")
    r0, r1 = torch.load(two / "weights_rank0.pt"), torch.load(two / "weights_rank1.pt")
    for k in w1:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
        assert torch.equal(r0[k], w1[k]), f"1 vs 2 processes differ on {k}: {(r0[k] - w1[k]).abs().max():.3g}"
    h1 = torch.load(one / "hessians_rank0.pt")
    h20, h21 = torch.load(two / "hessians_rank0.pt"), torch.load(two / "hessians_rank1.pt")
    assert h1 and h1.keys() == h20.keys() == h21.keys()
    for k in h1:
        assert torch.equal(h20[k], h21[k]) and torch.equal(h20[k], h1[k]), f"Hessian {k} differs"
    assert (one / "run.ptz").read_bytes() == (two / "run.ptz").read_bytes(), "artifacts differ"
    assert metric(log1, "final_roundtrip_exact") == metric(log2, "final_roundtrip_exact")
    if preset == "top":  # its test-time training too: per-document adapters, then SGD phases whose gradients sum as a tree
        assert [l[:14] for l in log1.splitlines() if l.startswith("ttt_phase:")] == [f"ttt_phase: {i}/3" for i in (1, 2, 3)]
        assert metric(log1, "final_ttt_exact") == metric(log2, "final_ttt_exact")
    if preset == "frontier":
        assert "layer_loop:enabled passes:2" in log1 and T.unpack_artifact((one / "run.ptz").read_bytes())[0]["config"]["LOOP_ACTIVE"] == 2
    rc, _, err, log3 = run_script({"EVAL_ONLY": 1, "ARTIFACT": one / "run.ptz", "RUN_ID": "eval", "VAL_MAX_TOKENS": 4096,
                                   "EVAL_STRIDE": 0, **precision}, tmp_path / "eval")
    assert rc == 0, err[-2000:]
    assert metric(log3, "final_roundtrip_exact") == metric(log1, "final_roundtrip_exact")


def test_two_processes_give_bit_identical_hessians_with_several_slots_per_rank(sample_data, tmp_path):
    """4 micro-batches: 4 slots on 1 rank, 2 on each of 2 ranks, so the midpoint tree is what makes them agree."""
    env = dict(CALIB_ONLY=1, MICRO_BATCHES=4, GPTQ_CALIB_BATCHES=3, OMP_NUM_THREADS=1)
    one, two = tmp_path / "one", tmp_path / "two"
    for d, n in ((one, 0), (two, 2)):
        d.mkdir()
        rc, _, err, _ = run_script(env | {"LOG_DIR": d}, d, nproc=n, script="tests/dist_worker.py")
        assert rc == 0, err[-2000:]
    h1, h20, h21 = (torch.load(p) for p in (one / "hessians_rank0.pt", two / "hessians_rank0.pt", two / "hessians_rank1.pt"))
    assert h1 and h1.keys() == h20.keys() == h21.keys()
    for k in h1:
        assert torch.equal(h20[k], h21[k]) and torch.equal(h20[k], h1[k]), f"Hessian {k} differs"


# ---------------------------------------------------------------- artifact
def tiny_hp(**kw):
    return T.Config(T.parse_hparams({"SMOKE": "1"}) | dict(NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1,
                                                         QUANT_MIN_NUMEL=1000, **kw))


def tiny_artifact():
    torch.manual_seed(0)
    model = T.GPT(tiny_hp())
    with torch.no_grad():  # zero-initialized tensors would hide mistakes: give everything random values
        for p in model.parameters():
            p.normal_(0, 0.05)
        model.blocks[0].mlp.fc.weight[3].zero_()  # one all-zero row must stay finite
    entries, _ = T.quantize_state(model.state_dict(), T.quant_kinds(model), tiny_hp())
    return model, entries, T.pack_artifact(entries, model.stored_config())


def test_artifact_round_trip_restores_dequantized_tensors_exactly():
    model, entries, blob = tiny_artifact()
    meta, back = T.unpack_artifact(blob)
    assert meta["config"] == model.stored_config()
    want, got = T.dequantize(entries), T.dequantize(back)
    assert want.keys() == got.keys() == model.state_dict().keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
        assert torch.isfinite(got[k]).all()
    schemes = {e["name"]: e["scheme"] for e in back}
    assert schemes["tok_emb.weight"] == "int8" and schemes["blocks.0.mlp.fc.weight"] == "int6"
    assert schemes["blocks.0.attn.q_gain"] == "fp32"
    fresh = T.GPT(meta["config"])
    fresh.load_state_dict(got)  # rebuilds from its own metadata


def test_quantized_values_lie_in_their_ranges():
    _, entries, _ = tiny_artifact()
    for e in entries:
        if "q" in e:
            qmax = {"int6": 31, "int8": 127}[e["scheme"]]
            assert e["q"].dtype == torch.int8 and int(e["q"].abs().max()) <= qmax
            assert e["scale"].dtype == torch.float16 and bool((e["scale"] > 0).all())
    w = torch.randn(16, 100)
    for bits, qmax in ((6, 31), (8, 127)):
        q, s, _ = T.quantize_rows(w, bits, [1.0])
        assert int(q.abs().max()) == qmax  # the row max maps onto the last level
        assert ((q.float() * s.float()[:, None] - w).abs() <= s.float()[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_damaged_artifact_is_refused(damage, tmp_path):
    _, _, blob = tiny_artifact()
    if damage == "flip":
        b = bytearray(blob)
        b[len(b) // 2] ^= 0x10
        blob = bytes(b)
    elif damage == "truncate":
        blob = blob[: len(blob) - 100]
    elif damage == "foreign":
        blob = b"PK\x03\x04" + blob[4:]
    else:
        blob = b""
    with pytest.raises(T.UserError, match="artifact|corrupt|truncated"):
        T.unpack_artifact(blob, "x.ptz")


# ---------------------------------------------------------------- shards
def write_shard(path, tokens, magic=T.SHARD_MAGIC, version=T.SHARD_VERSION, n=None):
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(tokens) if n is None else n
    path.write_bytes(header.tobytes() + np.asarray(tokens, "<u2").tobytes())


def test_shard_reader_validates_header_and_size(tmp_path):
    p = tmp_path / "x_val_000000.bin"
    write_shard(p, [1, 2, 3])
    assert T.load_data_shard(str(p)).tolist() == [1, 2, 3]
    for kw, msg in ((dict(magic=123), "bad header"), (dict(version=2), "bad header"), (dict(n=4), "header says 4 tokens")):
        write_shard(p, [1, 2, 3], **kw)
        with pytest.raises(T.UserError, match=msg):
            T.load_data_shard(str(p))
    p.write_bytes(b"\x00" * 10)
    with pytest.raises(T.UserError, match="corrupt shard"):
        T.load_data_shard(str(p))


def test_loader_gives_every_rank_its_disjoint_span(tmp_path):
    write_shard(tmp_path / "a_train_000000.bin", np.arange(100))
    write_shard(tmp_path / "a_train_000001.bin", np.arange(100, 150))
    files = sorted(str(p) for p in tmp_path.glob("*_train_*.bin"))
    whole = T.DistributedTokenLoader(files, 0, 1, "cpu")
    parts = [T.DistributedTokenLoader(files, r, 4, "cpu") for r in range(4)]
    for _ in range(5):  # wraps around both shards
        x, y = whole.next_batch(32, 4)
        xs, ys = zip(*(p.next_batch(32, 4) for p in parts))
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])


def test_shuffle_loader_reads_every_sequence_once_per_epoch_the_same_for_any_world_size(tmp_path):
    """LOADER=shuffle: per epoch each shard is cut into sequences of L + 1 tokens from a random phase below L, and all
    of them come out once, in an order set by SEED and the epoch; ranks read consecutive slices of each step's
    sequences, so the global batch is the same for 1, 2 and 4 ranks; state() and restore() resume mid-epoch."""
    write_shard(tmp_path / "a_train_000000.bin", np.arange(1000) % 60000)
    write_shard(tmp_path / "a_train_000001.bin", 10000 + np.arange(700))
    files = sorted(str(p) for p in tmp_path.glob("*_train_*.bin"))
    L, B = 16, 8 * 16
    make = lambda r, w, seed=7: T.ShuffleLoader(files, r, w, "cpu", seed, L)
    whole, per_epoch = make(0, 1), sum((n - 1 - p) // L for n, p in ((1000, 0), (700, 0)))
    epoch0, n0 = [], len(whole.order[0])
    while whole.epoch == 0:
        x, y = whole.next_batch(B, L)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal((y[:, 0] - x[:, 0]) % 60000, torch.ones(8, dtype=torch.long))
        epoch0 += [tuple(r) for r in x.tolist()]
    assert len(set(epoch0[:n0])) == n0 and per_epoch - 2 <= n0 <= per_epoch  # each sequence once
    starts = sorted(r[0] for r in epoch0[:n0] if r[0] < 1000)  # shard a: one phase below L, then steps of L
    assert {b - a for a, b in zip(starts, starts[1:])} == {L} and starts[0] < L
    for w in (2, 4):
        parts, ref = [make(r, w) for r in range(w)], make(0, 1)
        for _ in range(12):  # across an epoch boundary
            x, y = ref.next_batch(B, L)
            xs, ys = zip(*(p.next_batch(B, L) for p in parts))
            assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    a, b = make(0, 1), make(0, 1, seed=8)
    assert not torch.equal(a.next_batch(B, L)[0], b.next_batch(B, L)[0])
    for _ in range(3):
        a.next_batch(B, L)
    c = make(0, 1)
    c.restore(a.state())
    for _ in range(9):
        assert torch.equal(a.next_batch(B, L)[0], c.next_batch(B, L)[0])


# ---------------------------------------------------------------- bad input: one line, non-zero exit, nothing left
def corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    p = next(dst.glob("*_val_*.bin"))
    b = bytearray(p.read_bytes())
    b[0:4] = struct.pack("<i", 7)
    p.write_bytes(bytes(b))
    return dst


BAD = {
    "missing data": (lambda t, d: {"DATA_PATH": t / "nowhere"}, "matched nothing"),
    "corrupt shard": (lambda t, d: {"DATA_PATH": corrupt_copy(d, t / "c")}, "corrupt shard"),
    "vocab mismatch": (lambda t, d: {"VOCAB_SIZE": 512}, "has vocab 1024 but VOCAB_SIZE=512"),
    "batch not divisible": (lambda t, d: {"TRAIN_BATCH_TOKENS": 1000}, "TRAIN_BATCH_TOKENS=1000 is not divisible"),
    "short validation": (lambda t, d: {"VAL_MAX_TOKENS": 100}, "validation split has 100 tokens"),
    "non-finite loss": (lambda t, d: {"MATRIX_LR": 1e30, "EMBED_LR": 1e30, "SCALAR_LR": 1e30, "GRAD_CLIP_NORM": 0},
                        "non-finite training loss at step"),
    "unwritable log dir": (lambda t, d: {"LOG_DIR": t / "file" / "sub"}, "file"),
    "malformed value": (lambda t, d: {"NUM_LAYERS": "four"}, "NUM_LAYERS='four' is not a valid int"),
    "unknown preset": (lambda t, d: {"PRESET": "fast"}, "PRESET='fast' is unknown"),
    "unknown quantizer": (lambda t, d: {"QUANT_METHOD": "awq"}, "QUANT_METHOD='awq' must be rtn or gptq"),
    "unknown scale rule": (lambda t, d: {"QUANT_SCALE": "mse"}, "QUANT_SCALE='mse' must be search or sdclip"),
    "reserve fills the cap": (lambda t, d: {"QUANT_METHOD": "gptq", "MAX_WALLCLOCK_SECONDS": 5, "GPTQ_RESERVE_SECONDS": 5},
                              "GPTQ_RESERVE_SECONDS=5.0 must be in (0, MAX_WALLCLOCK_SECONDS=5.0)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_line_error(case, sample_data, tmp_path):
    make, msg = BAD[case]
    (tmp_path / "file").write_text("not a directory")
    env = make(tmp_path, sample_data[0])
    rc, out, err, log = run_script(env | {"ITERATIONS": 3}, tmp_path)
    assert rc != 0
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and msg in lines[-1], err[-2000:]
    assert "Traceback" not in err
    assert not list(tmp_path.glob("**/*.ptz")), "no artifact may be left behind"
    if case == "non-finite loss":
        assert "error: non-finite training loss" in log  # the log is still written


def test_wall_clock_cap_stops_training_and_warms_down():
    hp = T.parse_hparams({"MAX_WALLCLOCK_SECONDS": "10", "WARMDOWN_ITERS": "100", "ITERATIONS": "20000", "QUANT_METHOD": "rtn"})
    assert T.lr_multiplier(hp, 0, 0.0) == 1.0
    assert T.lr_multiplier(hp, 1, 0.0) == 1.0  # no time measured yet: no division by zero
    assert abs(T.lr_multiplier(hp, 10, 1000.0) - 0.9) < 1e-9  # 100 ms/step x 100 warmdown steps = 10 s; 9 s left
    assert abs(T.lr_multiplier(hp, 50, 5000.0) - 0.5) < 1e-9
    assert T.lr_multiplier(hp, 100, 10000.0) == 0.0
    gptq = dict(hp, QUANT_METHOD="gptq", GPTQ_RESERVE_SECONDS=4.0)  # the loop ends 4 s early: the warmdown with it
    assert T.train_cap_ms(gptq) == 6000.0 and T.train_cap_ms(dict(gptq, MAX_WALLCLOCK_SECONDS=0.0)) == 0.0
    assert abs(T.lr_multiplier(gptq, 10, 1000.0) - 0.5) < 1e-9 and T.lr_multiplier(gptq, 60, 6000.0) == 0.0


def test_capped_run_completes(sample_data, tmp_path):
    rc, _, err, log = run_script({"MAX_WALLCLOCK_SECONDS": 3, "ITERATIONS": 10000, "WARMDOWN_ITERS": 1000,
                                  "VAL_MAX_TOKENS": 8192, "EVAL_STRIDE": 0, "QAT_THRESHOLD": 0.15, "QUANT_METHOD": "rtn"}, tmp_path)
    assert rc == 0, err[-2000:]
    done = next(l for l in log.splitlines() if l.startswith("train_done"))
    steps = int(done.split("steps:")[1].split()[0])
    assert 0 < steps < 10000 and "late_qat:enabled" in log and "size_forecast:" in log


def test_readme_documents_every_hyperparameter_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    for name, _, _ in T.HPARAMS:
        assert f"`{name}`" in readme, name
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme


def test_config_is_resolved_once_and_read_only(sample_data):
    hp = T.resolve_config({"SMOKE": "1", "EVAL_SEQ_LEN": "64"})
    assert hp.eval_len == 64 and hp.arch == {k: hp[k] for k in T.ARCH_KEYS} and hp.clips == [1.0, 0.98, 0.96, 0.93, 0.9]
    for change in (lambda: hp.__setitem__("MATRIX_LR", 1.0), lambda: hp.update(MATRIX_LR=1.0), lambda: hp.pop("SEED"),
                   lambda: setattr(hp, "eval_len", 1), lambda: hp.setdefault("NEW", 1)):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert hp["MATRIX_LR"] == 0.025 and hp.eval_len == 64
    for twin in (copy.deepcopy(hp), pickle.loads(pickle.dumps(hp))):
        assert twin == hp and type(twin) is T.Config and twin.eval_len == 64


def test_eval_only_takes_the_architecture_from_the_artifact_and_ignores_training_schedules(sample_data):
    stored = T.resolve_config({"SMOKE": "1", "LOOP_LAYERS": "1", "LOOP_REPEATS": "1", "LOOP_START": "0.4"}).arch
    env = {"SMOKE": "1", "EVAL_ONLY": "1", "ARTIFACT": "x.ptz", "NUM_LAYERS": "9"}  # LOOP_START: the default, 2 values
    hp = T.resolve_config(env, stored_arch=stored | {"LOOP_ACTIVE": 1})
    assert hp["NUM_LAYERS"] == 4 and hp["LOOP_REPEATS"] == 1 and hp.loop_starts == []
