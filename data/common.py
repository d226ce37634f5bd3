"""What data/ and tools/ share, without torch: the user-error class, one atomic file write, the command-line wrapper,
the challenge constants and the shard format.

Needs only the standard library (and numpy inside the shard functions), so the data scripts run on a machine without
torch and the tools that never read a shard need nothing more. The constants are defined once, in train_gpt.py (a
record folder ships that file alone); this module reads them from its source with `ast` and never imports it
(importing it would import torch):
  LIMIT_BYTES, LIMIT_SECONDS   the challenge's size limit (code + artifact bytes) and time limit (seconds)
  CODE_HEAD, CODE_END          the lines around the script that every log of train_gpt.py starts with
  FREE_SETTINGS                settings that do not change what a run computes (names, places, logging, kernels)
  SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS, BOS_ID   the shard format
A shard is SHARD_HEADER_INTS little-endian int32 (magic, version, token count, then zeros) followed by that many
little-endian uint16 tokens; every document starts with BOS_ID.
"""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

TRAIN_GPT = Path(__file__).resolve().parents[1] / "train_gpt.py"
CONSTANT_NAMES = ("LIMIT_BYTES", "LIMIT_SECONDS", "CODE_HEAD", "CODE_END", "FREE_SETTINGS", "SHARD_MAGIC", "SHARD_VERSION",
                  "SHARD_HEADER_INTS", "BOS_ID")


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line `error: ...` without a traceback."""


# ----------------------------------------------------------------------------- constants from train_gpt.py
def read_constants(path: str | Path, names=CONSTANT_NAMES) -> dict:
    """The values of top-level `NAME = literal` and `A, B = literal, literal` assignments in a Python file, by name.

    Only the file's text is read (nothing is imported or run). A missing name, or one not bound to a literal, is a
    UserError naming it."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=str(path))
    except OSError as e:
        raise UserError(f"cannot read the challenge constants: {path}: {e.strerror}") from None
    except (SyntaxError, ValueError) as e:
        raise UserError(f"cannot read the challenge constants: {path} is not valid Python ({e})") from None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            pairs = [(target, value)]
        elif (isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts)
              and all(isinstance(t, ast.Name) for t in target.elts)):
            pairs = list(zip(target.elts, value.elts))
        else:
            continue
        for t, v in pairs:
            if t.id in names:
                try:
                    found[t.id] = ast.literal_eval(v)
                except ValueError:
                    raise UserError(f"{path}:{node.lineno}: {t.id} is not assigned a literal value; the tools read it "
                                    "as NAME = literal") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(f"{path} defines no top-level {', '.join(missing)} (NAME = literal); data/ and tools/ read "
                        "the challenge constants from it")
    return found


try:
    _C = read_constants(TRAIN_GPT)
except UserError as _e:
    raise SystemExit(f"error: {_e}") from None  # one line for a user; a broken checkout, not a bug to trace
LIMIT_BYTES: int = _C["LIMIT_BYTES"]
LIMIT_SECONDS: float = _C["LIMIT_SECONDS"]
CODE_HEAD: str = _C["CODE_HEAD"]
CODE_END: str = _C["CODE_END"]
FREE_SETTINGS: tuple = _C["FREE_SETTINGS"]  # settings that do not change what a run computes
SHARD_MAGIC: int = _C["SHARD_MAGIC"]
SHARD_VERSION: int = _C["SHARD_VERSION"]
SHARD_HEADER_INTS: int = _C["SHARD_HEADER_INTS"]
BOS_ID: int = _C["BOS_ID"]


# ----------------------------------------------------------------------------- files
def write_atomic(path: str | Path, data, what: str = "file") -> None:
    """Write `data` (bytes, str as UTF-8, or a list of bytes-like parts) to `path` all or nothing: a temporary name
    in the same folder, fsync, then rename over `path`. On failure the temporary file is removed and a one-line
    UserError says what could not be written."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    parts = [data.encode()] if isinstance(data, str) else data if isinstance(data, (list, tuple)) else [data]
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise UserError(f"cannot write {what} {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- command line
def _script_user_error(e: BaseException) -> bool:
    """train_gpt.py's own UserError (it ships alone in a record folder, so it cannot import this class). Matched by
    name and module rather than imported: importing train_gpt would import torch."""
    return type(e).__name__ == "UserError" and type(e).__module__ in ("train_gpt", "__main__")


def one_line(e: BaseException) -> str | None:
    """The `error: ...` line for a user-facing exception (UserError, train_gpt's UserError, OSError), else None."""
    if isinstance(e, UserError) or _script_user_error(e):
        return f"error: {e}"
    if isinstance(e, OSError):
        return f"error: {str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}"
    return None


def run_main(main, argv=None, code: int = 1, interrupted: str | None = None) -> int:
    """main(argv)'s exit status (None counts as 0); a user error is printed as one line on stderr and gives `code`,
    Ctrl-C gives 130 (after the line `interrupted`, if given). Anything else is a bug and keeps its traceback."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
        line = one_line(e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return code


def cli(main, code: int = 1, interrupted: str | None = None):
    """A script's entry point: exit with run_main(main, sys.argv[1:], code, interrupted)."""
    sys.exit(run_main(main, sys.argv[1:], code, interrupted))


# ----------------------------------------------------------------------------- shards
def read_shard_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count. (train_gpt.py has the same reader, same messages.)"""
    import numpy as np
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


def load_data_shard(path: str | Path):
    """All tokens of one shard as a uint16 numpy array, after full header/size validation."""
    import numpy as np
    n = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=n, offset=4 * SHARD_HEADER_INTS)


def write_shard(path: str | Path, tokens) -> None:
    """Write one shard (header + little-endian uint16 tokens, a uint16 numpy array) atomically."""
    import numpy as np
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16:
        raise ValueError(f"shard tokens must be uint16, got {tokens.dtype}")
    if len(tokens) >= 1 << 31:
        raise ValueError("too many tokens for one shard (header holds an int32)")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    write_atomic(path, [header.tobytes(), np.ascontiguousarray(tokens, dtype="<u2").data], what="shard")
