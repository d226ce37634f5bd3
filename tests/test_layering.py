"""Layering: data/ runs without torch (and without importing train_gpt.py), the constants and the shard format are
defined once in train_gpt.py and read from its source by data/common.py, both shard readers agree, and the tools
share one error class, one atomic write and one command-line wrapper (data.common)."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from data import common
from data.common import UserError

import train_gpt as T  # noqa: E402  (the reference the torch-free copies are checked against)

DATA_SCRIPTS = sorted((ROOT / "data").glob("*.py"))
# Run a script as `python SCRIPT ARGS...` would, in a process where torch and train_gpt cannot be imported.
NO_TORCH = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['train_gpt'] = None; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_without_torch(script: str, *args, env=None, cwd=ROOT, timeout=300):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT / script), *map(str, args)], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


# ----------------------------------------------------------------------------- data/ without torch
@pytest.mark.parametrize("path", DATA_SCRIPTS, ids=lambda p: p.name)
def test_data_imports_neither_torch_nor_train_gpt(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("torch", "train_gpt")}
    assert not bad, f"{path.name} imports {bad}: data/ must run with the standard library, numpy and sentencepiece"


def test_the_no_torch_harness_refuses_torch(tmp_path):
    """The harness itself: a script that imports torch, or train_gpt.py (which imports torch), fails under it."""
    for name in ("torch", "train_gpt"):
        (tmp_path / f"uses_{name}.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport {name}\n")
        p = run_without_torch(tmp_path / f"uses_{name}.py")
        assert p.returncode == 1 and f"import of {name} halted" in p.stderr, p.stderr


@pytest.mark.parametrize("script", ["data/prepare_text.py", "data/build_sample.py", "data/cached_challenge_fineweb.py"])
def test_data_help_without_torch(script):
    p = run_without_torch(script, "--help")
    assert p.returncode == 0 and p.stdout.startswith("usage:"), p.stderr


def test_prepare_text_builds_shards_without_torch(tmp_path):
    docs = ["The cat sat on the mat.", "A dog ran in the park.", "The sun is hot today.", "Birds sing at dawn and dusk.",
            "Rain falls on the roof.", "The cat and the dog play."]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / "tiny_sp40"
    p = run_without_torch("data/prepare_text.py", tmp_path / "docs.txt", "--out", out, "--vocab-size", 40,
                          "--val-docs", 2, "--workers", 1, "-q")
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["docs"] == {"val": 2, "train": 4} and m["tokenizer"]["vocab_size"] == 40
    for split in ("val", "train"):
        toks = np.concatenate([T.load_data_shard(str(out / s["file"])) for s in m["shards"][split]])  # train_gpt's reader
        assert len(toks) == m["tokens"][split] and (toks == T.BOS_ID).sum() == m["docs"][split] and toks[0] == T.BOS_ID
    # a user error is still one line, exit status 1
    p = run_without_torch("data/prepare_text.py", tmp_path / "docs.txt", "--out", out, "--vocab-size", 70000, "-q")
    assert p.returncode == 1 and p.stderr == "error: vocab size 70000 does not fit uint16 token storage (at most 65536)\n"


def test_build_sample_verifies_without_torch(sample_data):
    data_path, tok_path = sample_data
    p = run_without_torch("data/build_sample.py")
    assert p.returncode == 0 and p.stdout.startswith(f"sample data ready: {data_path}"), p.stderr


def test_downloader_without_torch(tmp_path):
    from test_data import FakeHub, published
    hub = FakeHub(published(tmp_path, "test/golf", [1024]))
    try:
        env = {"HF_ENDPOINT": hub.endpoint, "PG_DATA_REPO": "test/golf", "NO_PROXY": "127.0.0.1"}
        p = run_without_torch("data/cached_challenge_fineweb.py", "--train-shards", 1, "--data-dir", tmp_path / "d", "-q",
                              env=env)
        assert p.returncode == 0, p.stderr
        ds = tmp_path / "d" / "datasets" / "fineweb10B_sp1024"
        assert sorted(f.name for f in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
        assert len(T.load_data_shard(str(ds / "fineweb_val_000000.bin"))) == 600
        p = run_without_torch("data/cached_challenge_fineweb.py", "--variant", "sp1", "--data-dir", tmp_path / "d", env=env)
        assert p.returncode == 1 and p.stderr == "error: unknown variant 'sp1' in test/golf; published variants there: sp1024\n"
    finally:
        hub.server.shutdown()


# ----------------------------------------------------------------------------- constants: defined once, in train_gpt.py
def test_constants_agree_with_train_gpt():
    for name in common.CONSTANT_NAMES:
        mine, theirs = getattr(common, name), getattr(T, name)
        assert mine == theirs and type(mine) is type(theirs), name


def test_read_constants_reads_literals_without_running(tmp_path):
    f = tmp_path / "script.py"
    f.write_text('import nothing_that_exists\nA = 16_000_000  # comment\nB, C = "x{y}", 0.5\nD: int = -3\n'
                 'def f():\n    E = 1\nA = 17\n', encoding="utf-8")
    assert common.read_constants(f, ("A", "B", "C", "D")) == dict(A=17, B="x{y}", C=0.5, D=-3)  # the last binding wins
    with pytest.raises(UserError, match=r"defines no top-level E, F \(NAME = literal\)"):
        common.read_constants(f, ("A", "E", "F"))  # E is only a local of f()
    f.write_text("A = len('x')\n")
    with pytest.raises(UserError, match=r"script.py:1: A is not assigned a literal value"):
        common.read_constants(f, ("A",))
    with pytest.raises(UserError, match="cannot read the challenge constants: .*missing.py"):
        common.read_constants(tmp_path / "missing.py", ("A",))


def test_a_missing_constant_is_one_line_at_import(tmp_path):
    """data/common.py beside a train_gpt.py that lacks a constant: importing it fails with one clear line."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "common.py").write_bytes((ROOT / "data" / "common.py").read_bytes())
    src = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    src = re.sub(r"^CODE_END = .*$", "", src, flags=re.M)
    assert "\nCODE_END =" not in src
    (tmp_path / "train_gpt.py").write_text(src, encoding="utf-8")
    p = subprocess.run([sys.executable, "-c", "import data.common"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: ") and "defines no top-level CODE_END" in p.stderr


def test_tools_take_the_limits_and_markers_from_train_gpt():
    from tools import check_record, gpu_check, logparse
    assert logparse.LIMIT == T.LIMIT_BYTES and logparse.RECORD_SECONDS == T.LIMIT_SECONDS
    assert gpu_check.COMPETITION_LIMIT == T.LIMIT_BYTES and gpu_check.TRAIN_BUDGET_S == gpu_check.EVAL_BUDGET_S == T.LIMIT_SECONDS
    head = T.CODE_HEAD.format(name="x y.py", n=12, sha="ab" * 32).encode() + b"\n"
    assert logparse._HEAD.fullmatch(head).groups() == (b"x y.py", b"12", b"ab" * 32)
    assert logparse._TAIL == f"\n{T.CODE_END}\n".encode() and check_record._LOGLIKE.match(head)
    for path in (ROOT / "tools").glob("*.py"):  # the values are written nowhere else
        text = path.read_text(encoding="utf-8")
        assert "16_000_000 " not in text and "= 600.0" not in text and T.CODE_END not in text, path.name


# ----------------------------------------------------------------------------- the two shard readers
def shard_cases(tmp: Path) -> list[Path]:
    """Good shards and every kind of broken one."""
    good = np.arange(50, dtype=np.uint16)
    common.write_shard(tmp / "good.bin", good)
    common.write_shard(tmp / "empty.bin", np.zeros(0, dtype=np.uint16))
    raw = (tmp / "good.bin").read_bytes()
    header = np.frombuffer(raw[:4 * T.SHARD_HEADER_INTS], dtype="<i4").copy()
    cases = {"good.bin": None, "empty.bin": None, "truncated.bin": raw[:-2], "longer.bin": raw + b"\0\0",
             "short_header.bin": raw[:100], "nothing.bin": b"", "odd.bin": raw + b"\0"}
    for name, idx, val in (("magic.bin", 0, 1), ("version.bin", 1, 2), ("count.bin", 2, 51), ("negative.bin", 2, -1)):
        h = header.copy()
        h[idx] = val
        cases[name] = h.tobytes() + raw[4 * T.SHARD_HEADER_INTS:]
    for name, data in cases.items():
        if data is not None:
            (tmp / name).write_bytes(data)
    (tmp / "folder.bin").mkdir()
    return [tmp / n for n in cases] + [tmp / "missing.bin", tmp / "folder.bin"]


def outcome(fn, path):
    try:
        r = fn(path)
    except Exception as e:  # noqa: BLE001 - the two readers raise their own UserError classes
        assert type(e).__name__ == "UserError", repr(e)
        return ("error", str(e))
    return ("ok", r.tolist() if isinstance(r, np.ndarray) else r)


def test_both_shard_readers_accept_and_refuse_the_same_files(tmp_path):
    results = {}
    for path in shard_cases(tmp_path):
        for name in ("read_shard_header", "load_data_shard"):
            mine, theirs = outcome(getattr(common, name), str(path)), outcome(getattr(T, name), str(path))
            assert mine == theirs, (path.name, name, mine, theirs)
        results[path.name] = outcome(common.read_shard_header, path)  # a Path works too
    assert results["good.bin"] == ("ok", 50) and results["empty.bin"] == ("ok", 0)
    assert sum(kind == "error" for kind, _ in results.values()) == len(results) - 2
    assert results["magic.bin"][1].startswith(f"corrupt shard {tmp_path / 'magic.bin'}: bad header")
    assert results["missing.bin"][1].startswith("cannot read shard ")
    np.testing.assert_array_equal(common.load_data_shard(tmp_path / "good.bin"), np.arange(50))
    with pytest.raises(ValueError, match="uint16"):
        common.write_shard(tmp_path / "x.bin", np.arange(3))


# ----------------------------------------------------------------------------- one error class, write, wrapper
def test_write_atomic(tmp_path, monkeypatch):
    f = tmp_path / "out.txt"
    common.write_atomic(f, "é\n")
    common.write_atomic(str(tmp_path / "parts.bin"), [b"ab", memoryview(b"cd")])
    assert f.read_bytes() == "é\n".encode() and (tmp_path / "parts.bin").read_bytes() == b"abcd"
    with pytest.raises(UserError, match=r"^cannot write summary .*no_dir.*: No such file or directory$"):
        common.write_atomic(tmp_path / "no_dir" / "x.json", b"{}", what="summary")

    def fail(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(UserError, match=f"^cannot write file {re.escape(str(f))}: No space left on device$"):
        common.write_atomic(f, b"new")
    assert f.read_bytes() == "é\n".encode() and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "parts.bin"]


class ScriptError(Exception):
    """Stands in for train_gpt.py's own UserError (a class of the same name in module train_gpt or __main__)."""


def test_run_main_and_cli(capsys):
    def raising(e):
        def main(argv):
            assert argv == ["a"]
            raise e
        return main

    assert common.run_main(lambda argv: None, ["a"]) == 0 and common.run_main(lambda argv: 3, ["a"]) == 3
    assert common.run_main(raising(UserError("bad input")), ["a"]) == 1
    assert capsys.readouterr().err == "error: bad input\n"
    assert common.run_main(raising(FileNotFoundError(2, "No such file or directory", "x.log")), ["a"], code=2) == 2
    assert capsys.readouterr().err == "error: x.log: No such file or directory\n"
    assert common.run_main(raising(KeyboardInterrupt()), ["a"]) == 130 and capsys.readouterr().err == ""
    assert common.run_main(raising(KeyboardInterrupt()), ["a"], interrupted="stopped") == 130
    assert capsys.readouterr().err == "stopped\n"
    for module in ("train_gpt", "__main__"):
        err = type("UserError", (Exception,), {"__module__": module})
        assert common.run_main(raising(err("from the script")), ["a"]) == 1
        assert capsys.readouterr().err == "error: from the script\n"
    with pytest.raises(ScriptError):  # anything else is a bug: its traceback is kept
        common.run_main(raising(ScriptError("bug")), ["a"])
    assert common.one_line(T.UserError("real")) == "error: real"  # the real class is recognized
    old = sys.argv
    sys.argv = ["prog", "a"]
    try:
        with pytest.raises(SystemExit) as e:
            common.cli(raising(UserError("one line")), code=2)
    finally:
        sys.argv = old
    assert e.value.code == 2 and capsys.readouterr().err == "error: one line\n"


def test_tools_share_the_error_class_and_wrapper():
    from tools import check_record, gpu_check, inspect_artifact, logparse, make_record, pack_code, plot_log, significance
    for m in (check_record, gpu_check, inspect_artifact, logparse, make_record, pack_code, plot_log, significance):
        assert m.UserError is UserError, m.__name__
        assert not hasattr(m, "ToolError") and not hasattr(m, "CheckError") and not hasattr(m, "atomic_write")
    assert "tools.logparse" not in imported_modules(ROOT / "tools" / "pack_code.py")
    # pack_code (a reviewer unpacks a record with it) needs only the standard library, and no log parser
    p = subprocess.run([sys.executable, "-c", "import sys; sys.modules.update(dict.fromkeys(['tools.logparse', 'numpy', "
                        "'torch', 'train_gpt'])); sys.path.insert(0, sys.argv[1]); import tools.pack_code", str(ROOT)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_no_references_to_files_outside_the_repository():
    for path in [*DATA_SCRIPTS, *(ROOT / "tools").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"DESIGN|shared/", text), path.name
