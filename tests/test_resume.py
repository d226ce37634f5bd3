"""Issue 16: checkpoints that resume bit-exactly (SIGKILL under torchrun --max-restarts, SIGTERM, another world size),
damaged or foreign checkpoints refused with one line, and their settings validated."""
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_gpt as T
from conftest import ROOT, once, run_script

# a tiny 2-rank-friendly model; MAX_WALLCLOCK_SECONDS=0 (SMOKE): a step-based schedule, so a resumed run must be bit-exact
TINY = dict(NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, XSA_LAST_N=1, VE_LAYERS="-1", BIGRAM_VOCAB_SIZE=128,
            ITERATIONS=16, WARMDOWN_ITERS=8, MUON_MOMENTUM_WARMUP_STEPS=8, TRAIN_LOG_EVERY=1, EMA_DECAY=0.8,
            QUANT_MIN_NUMEL=1000, VAL_MAX_TOKENS=4096, EVAL_STRIDE=32, GPTQ_CALIB_BATCHES=2, QAT_THRESHOLD=0.5,
            CHECKPOINT_EVERY=0, LOOP_LAYERS="1", LOOP_REPEATS=1, LOOP_START=0.1)
FINAL = ("pre_quant_exact", "artifact: path=", "total_submission_bytes", "final_roundtrip_exact val_loss", "final_sliding_exact")


def env_of(tmp: Path, **kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SMOKE="1", LOG_DIR=str(tmp), RUN_ID="run", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in (TINY | kw).items()})
    return env


def launch(tmp: Path, restarts: int | None = None, script="tests/dist_worker.py", **kw) -> subprocess.Popen:
    """`script` on 2 gloo ranks under torchrun (with --max-restarts when given), not waited for."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [f"--max-restarts={restarts}"] if restarts is not None else []
    return subprocess.Popen(cmd + [script], cwd=ROOT, env=env_of(tmp, **kw), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout=300) -> tuple[str, str]:
    """Wait for a launched run; on a hang, end its whole process group rather than leave workers behind."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise


def rank_pid(parent: int, rank: int) -> int:
    """The worker process of `rank` among the children of the torchrun agent."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in proc.joinpath("environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, IndexError, ValueError):
            continue
    raise AssertionError(f"no rank {rank} under {parent}")


def wait_for(cond, p: subprocess.Popen, what: str, timeout=120):
    t0 = time.time()
    while not cond():
        assert p.poll() is None, f"run ended before {what}: " + p.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.01)


def final_lines(log: str) -> list[str]:
    """The result lines of the last run in a log (a restarted run appends to it), run-specific paths and times cut."""
    lines = log.splitlines()
    out = [re.sub(r"path=\S+ | (eval|export)_seconds:\S+", "", l) for l in lines if l.startswith(FINAL)]
    return out[-len(FINAL):]


def assert_same_as(ref: Path, got: Path, ranks=(0, 1)):
    w = torch.load(ref / "weights_rank0.pt")
    for r in ranks:
        g = torch.load(got / f"weights_rank{r}.pt")
        assert w.keys() == g.keys()
        for k in w:
            assert torch.equal(w[k], g[k]), f"rank {r} differs from the uninterrupted run on {k}"
    assert (ref / "run.ptz").read_bytes() == (got / "run.ptz").read_bytes(), "artifacts differ"
    a, b = final_lines((ref / "run.txt").read_text()), final_lines((got / "run.txt").read_text())
    assert len(a) == len(FINAL) and a == b


@pytest.fixture(scope="module")
def reference(sample_data, tmp_path_factory):
    """The uninterrupted 2-rank run, no checkpoints."""
    with once(tmp_path_factory, "resume_reference") as (tmp, first):
        if first:
            p = launch(tmp)
            out, err = finish(p)
            assert p.returncode == 0, err[-3000:]
    log = (tmp / "run.txt").read_text()  # the QAT switch and the loop depth flip mid-run: their states matter
    assert "late_qat:enabled" in log and "layer_loop:enabled passes:1 step:2 " in log
    return tmp


def test_sigkill_of_one_rank_under_max_restarts_resumes_bit_exactly(reference, tmp_path):
    """torchrun --max-restarts=1 with RESUME=auto: SIGKILL rank 1 once a checkpoint exists; the agent restarts both
    ranks, they resume from the checkpoint with no manual step and end bit-identical to the uninterrupted run."""
    p = launch(tmp_path, restarts=1, RESUME="auto", CHECKPOINT_EVERY=4)
    wait_for(lambda: (tmp_path / "run.ckpt").exists(), p, "checkpoint")
    os.kill(rank_pid(p.pid, 1), signal.SIGKILL)
    out, err = finish(p)
    assert p.returncode == 0, err[-3000:]
    log = (tmp_path / "run.txt").read_text()
    assert "resume: no checkpoint at" in log  # the first attempt started fresh
    resumed = [l for l in log.splitlines() if l.startswith("resume: ") and " step:" in l]
    assert len(resumed) == 1 and 0 < int(resumed[0].split("step:")[1].split()[0]) < TINY["ITERATIONS"], resumed
    assert_same_as(reference, tmp_path)


def test_sigterm_to_one_rank_checkpoints_exits_and_resumes_on_one_process(reference, tmp_path):
    """SIGTERM to rank 1 only: both ranks agree (through the per-step all-reduce), write a checkpoint even with
    CHECKPOINT_EVERY=0, and exit non-zero with a line saying how to resume. Resumed on 1 process (the checkpoint holds
    all of Muon's per-rank state), the run ends bit-identical to the uninterrupted 2-rank run."""
    p = launch(tmp_path, script="train_gpt.py")
    wait_for(lambda: "step:4/" in ((tmp_path / "run.txt").read_text() if (tmp_path / "run.txt").exists() else ""), p, "step 4")
    os.kill(rank_pid(p.pid, 1), signal.SIGTERM)
    out, err = finish(p)
    assert p.returncode != 0
    stop = [l for l in err.splitlines() if l.startswith("error: stopped by SIGTERM/SIGINT at step")]
    assert len(stop) == 1 and "RUN_ID=run RESUME=auto" in stop[0], err[-3000:]
    assert (tmp_path / "run.ckpt").exists() and not (tmp_path / "run.ptz").exists()
    assert not list(tmp_path.glob("*.tmp*")), "a temporary file was left behind"
    rc, _, err, log = run_script(TINY | {"RESUME": "auto", "LOG_DIR": tmp_path}, tmp_path, script="tests/dist_worker.py")
    assert rc == 0, err[-3000:]
    assert f"resume: {tmp_path / 'run.ckpt'} step:" in log
    assert_same_as(reference, tmp_path, ranks=(0,))


# ---------------------------------------------------------------- damaged, foreign, other settings: one line
@pytest.fixture(scope="module")
def checkpoint(sample_data, tmp_path_factory):
    """A real checkpoint of a tiny model after two steps, written by save_checkpoint itself."""
    tmp = tmp_path_factory.mktemp("ckpt")
    hp = T.parse_hparams({k: str(v) for k, v in TINY.items()} | {"SMOKE": "1"})
    model = T.GPT(hp)
    opts = T.build_optimizers(hp, T.Context(), model)
    files = T.shard_files(hp, "train")
    loader = T.DistributedTokenLoader(files, 0, 1, torch.device("cpu"))
    for _ in range(2):
        x, y = loader.next_batch(hp["TRAIN_BATCH_TOKENS"], hp["TRAIN_SEQ_LEN"])
        model(x, y).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    ema = [p.detach().clone() for p in model.parameters()]
    lines = []
    model.switch(qat=True, loops=0)
    T.save_checkpoint(T.Context(log=lines.append), str(tmp / "run.ckpt"), T.checkpoint_config(hp, files),
                      T.TrainState(model, opts, ema, loader, step=2, elapsed_ms=123.0, forecast_done=True))
    assert len(lines) == 1 and lines[0].startswith("checkpoint: step:2 ")
    return hp, files, tmp / "run.ckpt", model, opts, loader


def test_checkpoint_round_trip_restores_the_whole_state(checkpoint):
    hp, files, path, model, opts, loader = checkpoint
    ck = T.load_checkpoint(str(path), T.checkpoint_config(hp, files))
    fresh = T.GPT(hp)
    fopts = T.build_optimizers(hp, T.Context(), fresh)
    floader = T.DistributedTokenLoader(files, 0, 1, torch.device("cpu"))
    ema = [torch.zeros_like(p) for p in fresh.parameters()]
    ts = T.TrainState(fresh, fopts, ema, floader)
    T.restore_checkpoint(ck, ts)
    assert (ts.step, ts.elapsed_ms, ts.forecast_done, fresh.sw) == (2, 123.0, True, T.Switches(qat=True))
    assert all(m.qat.item() for _, m in fresh.linears())  # the QAT flag reached every matrix
    for (k, a), b, e in zip(model.state_dict().items(), fresh.state_dict().values(), ema):
        assert torch.equal(a, b) and torch.equal(a, e), k
    for p, q in zip(opts[0].param_groups[0]["params"], fopts[0].param_groups[0]["params"]):
        assert torch.equal(opts[0].state[p]["m"], fopts[0].state[q]["m"])
    assert ck["muon"].numel() == sum(p.numel() for p in opts[0].param_groups[0]["params"])  # no cached buffers
    assert set(ck["adam"]["state"]) == set(opts[1].state_dict()["state"])
    assert (floader.stream.idx, floader.stream.pos) == (loader.stream.idx, loader.stream.pos)
    assert torch.equal(floader.next_batch(4096, 128)[0], loader.next_batch(4096, 128)[0])


def forged(payload_obj) -> bytes:
    buf = io.BytesIO()
    torch.save(payload_obj, buf)
    return T.CKPT_MAGIC + hashlib.sha256(buf.getvalue()).digest() + buf.getvalue()


DAMAGE = {
    "truncated": (lambda b: b[: len(b) // 2], "corrupted or truncated (checksum mismatch)"),
    "byte-flipped": (lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1:], "corrupted or truncated"),
    "empty": (lambda b: b"", "not a checkpoint written by train_gpt.py"),
    "an artifact": (lambda b: T.ARTIFACT_MAGIC + b, "not a checkpoint written by train_gpt.py"),
    "arbitrary pickle": (lambda b: forged({"config": T.UserError("x")}), "malformed"),  # weights_only refuses objects
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_refused_with_one_line(case, checkpoint, tmp_path):
    hp, files, path, *_ = checkpoint
    damage, msg = DAMAGE[case]
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(T.UserError, match=re.escape(msg)) as e:
        T.load_checkpoint(str(bad), T.checkpoint_config(hp, files))
    assert "\n" not in str(e.value)


def test_checkpoint_from_other_settings_is_refused_naming_them(checkpoint):
    hp, files, path, *_ = checkpoint
    with pytest.raises(T.UserError, match=r"other settings: MATRIX_LR=0.025 \(now 0.03\), NUM_LAYERS=2 \(now 3\)"):
        T.load_checkpoint(str(path), T.checkpoint_config(dict(hp, NUM_LAYERS=3, MATRIX_LR=0.03), files))
    with pytest.raises(T.UserError, match="train_shards"):
        T.load_checkpoint(str(path), T.checkpoint_config(hp, files[:1]))
    # places, logging, compilation and checkpointing may change; so may the world size (not part of the config)
    T.load_checkpoint(str(path), T.checkpoint_config(dict(hp, RUN_ID="x", LOG_DIR="y", COMPILE=1, CHECKPOINT_EVERY="9"), files))


def test_damaged_checkpoint_stops_the_script_with_one_line(checkpoint, tmp_path):
    _, _, path, *_ = checkpoint
    b = bytearray(path.read_bytes())
    b[-10] ^= 0x40
    (tmp_path / "run.ckpt").write_bytes(bytes(b))
    rc, _, err, _ = run_script(TINY | {"RESUME": "auto"}, tmp_path)
    assert rc != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: checkpoint {tmp_path / 'run.ckpt'} is corrupted or truncated " \
                                           "(checksum mismatch); delete it to start over"
    assert not list(tmp_path.glob("*.ptz"))


@pytest.mark.parametrize("env,msg", [
    ({"CHECKPOINT_EVERY": "5m"}, "CHECKPOINT_EVERY='5m' must be a step count (500), seconds (600s) or 0"),
    ({"CHECKPOINT_EVERY": "-3"}, "CHECKPOINT_EVERY='-3' must be"),
    ({"CHECKPOINT_EVERY": "infs"}, "CHECKPOINT_EVERY='infs' must be"),
    ({"RESUME": "auto", "RUN_ID": ""}, "RESUME=auto needs RUN_ID=name"),
    ({"AUTOCAST": "fp16"}, "AUTOCAST='fp16' must be auto, bf16 or off"),
])
def test_bad_settings_are_one_line_errors(env, msg):
    hp = T.parse_hparams({"SMOKE": "1"} | env)
    with pytest.raises(T.UserError, match=re.escape(msg)):
        T.check_hparams(hp, 1)


def test_checkpoint_interval_forms():
    assert T.checkpoint_every({"CHECKPOINT_EVERY": "500"}) == (500, 0.0)
    assert T.checkpoint_every({"CHECKPOINT_EVERY": "600s"}) == (0, 600.0)
    assert T.checkpoint_every({"CHECKPOINT_EVERY": "0"}) == (0, 0.0)
    assert T.checkpoint_every({"CHECKPOINT_EVERY": "0.5s"}) == (0, 0.5)
