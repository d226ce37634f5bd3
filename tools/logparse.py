"""The one parser of training logs shared by the tools, and their common command-line plumbing.

Reads this project's logs (LOG_DIR/RUN_ID.txt written by train_gpt.py: a `==== code: ... ====` block holding the
script byte for byte, then `key:value` lines) and, tolerantly, logs in the formats of openai/parameter-golf records
(the script text followed by a line of 100 '=', or a plain stdout capture; `final_*_exact` result lines,
`Serialized model ...: N bytes`, `Code size: N bytes`). Lines are read as `key:value` tokens, never by position.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import statistics
import sys

LIMIT = 16_000_000  # code + artifact bytes, decimal
RECORD_SECONDS = 600.0  # training (and, separately, evaluation) budget of the record track
TRACKS = ("10min_16mb", "non_record_16mb")
PREFERRED_METRICS = ("final_sliding_exact", "final_roundtrip_exact")  # this project's lines, best first
# Hyperparameter lines that are not part of a run's configuration: its identity, machine paths, log cadence.
NOT_CONFIG = {"seed", "run_id", "log_dir", "artifact", "data_path", "tokenizer_path", "train_log_every", "val_loss_every"}

_HEAD = re.compile(rb"==== code: (.+?) code_bytes:(\d+) sha256:([0-9a-f]{64}) ====\n")
_TAIL = b"\n==== end of code ====\n"
_UPSTREAM_RULE = b"\n" + b"=" * 100 + b"\n"
_TOKEN = re.compile(r"(?<!\S)([A-Za-z_][\w.]*)[:=](\S+)")
_HPARAM = re.compile(r"([a-z][a-z0-9_]*):(.*)")
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class ToolError(Exception):
    """A user-facing problem, reported as one line `error: ...` and exit status 1."""


def num(v):
    """'374019ms' -> 374019.0; None when the value holds no number."""
    m = _NUM.match(v) if isinstance(v, str) else None
    return float(m.group()) if m else None


def tokens(line: str) -> dict:
    return {k: v for k, v in _TOKEN.findall(line)}


class Log:
    """Facts of one training log. Missing facts are None (upstream logs lack many)."""

    def __init__(self, path: str):
        self.path, self.name = path, os.path.basename(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ToolError(f"cannot read log {path}: {e.strerror}") from None
        self.raw, self.code, self.code_name, self.declared = raw, None, None, {}
        self.format = "upstream"
        heads = list(_HEAD.finditer(raw))
        if len(heads) > 1:
            raise ToolError(f"{path} holds {len(heads)} runs (a reused RUN_ID appends to the same log); keep one run per file")
        if heads:
            h = heads[0]
            name, n, sha = h.group(1).decode(errors="replace"), int(h.group(2)), h.group(3).decode()
            code, rest = raw[h.end():h.end() + n], raw[h.end() + n:]
            if len(code) != n or not rest.startswith(_TAIL) or hashlib.sha256(code).hexdigest() != sha:
                raise ToolError(f"{path}: the logged code block is damaged (length, sha256 or end marker does not match its header)")
            self.format, self.code, self.code_name = "this", code, name
            self.declared = dict(code_bytes=n, sha256=sha)
            text = (raw[:h.start()] + rest[len(_TAIL):]).decode("utf-8", errors="replace")
        else:
            text = raw.decode("utf-8", errors="replace")
            cut = raw.find(_UPSTREAM_RULE)
            if cut > 0:  # upstream logfile: the script's text, then a line of 100 '='
                try:
                    compile(raw[:cut], "train_gpt.py", "exec", dont_inherit=True)
                    self.code, self.code_name = raw[:cut], "train_gpt.py"
                    text = raw[cut:].decode("utf-8", errors="replace")
                except (SyntaxError, ValueError):
                    pass
        self._parse(text.splitlines())

    def _parse(self, lines):
        self.hparams, self.versions, self.run_id, self.error = {}, {}, None, None
        self.train, self.val, self.finals, self.info = [], [], {}, {}
        self.artifact_bytes = self.logged_total = self.logged_code_bytes = None
        self.train_done = {}
        in_hp = False
        for line in lines:
            line = line.rstrip("\r")
            head = line.split(" ", 1)[0]
            if in_hp:
                m = _HPARAM.fullmatch(line)
                if m and m.group(1) != "model_params":
                    self.hparams[m.group(1)] = m.group(2)
                    continue
                in_hp = False
            t = tokens(line)
            if line.startswith("run_id:") and self.format == "this" and not self.hparams:
                self.run_id, in_hp = line[7:], True
            elif line.startswith("python:") and "torch" in t:
                self.versions = t
                if m := re.search(r" device:(.*?) world_size:", line):  # GPU names hold spaces
                    self.versions["device"] = m.group(1)
            elif line.startswith("error: "):
                self.error = line[7:]
            elif head.startswith("step:") and "/" in head:
                s, total = head[5:].split("/", 1)
                p = dict(step=int(num(s) or 0), total=num(total), time_ms=num(t.get("train_time")))
                if "train_loss" in t:
                    self.train.append(dict(p, loss=num(t["train_loss"]), step_avg_ms=num(t.get("step_avg"))))
                if "val_bpb" in t:
                    self.val.append(dict(p, loss=num(t.get("val_loss")), bpb=num(t["val_bpb"])))
            elif "val_bpb" in t and (head.endswith("_exact") or head.startswith("final_")):
                self.finals[head] = dict(t, _line=line)
            elif head in ("train_done", "stopping_early:"):
                self.train_done = t
            elif head == "artifact:" and (m := re.search(r"\bbytes=(\d+)", line)):
                self.artifact_bytes = int(m.group(1))
            elif m := re.match(r"Serialized model[^:]*: (\d+) bytes", line):
                self.artifact_bytes = int(m.group(1))  # the last one is the compressed model
            elif m := re.match(r"(?:total_submission_bytes:|Total submission size[^:]*: )(\d+)", line):
                self.logged_total = int(m.group(1))
            elif m := re.match(r"(?:code_bytes:|Code size: )(\d+)", line):
                self.logged_code_bytes = int(m.group(1))
            elif head.startswith(("train_shards:", "model_params:")):
                self.info.update(t)
            elif head == "features:":
                self.info["features"] = line[10:]
            if "seed" in t and "seed" not in self.info and not self.hparams:
                self.info["seed"] = t["seed"]  # upstream: the first seed:N token
            if "world_size" in t and "world_size" not in self.info:
                self.info["world_size"] = t["world_size"]
        if self.logged_code_bytes is None:
            self.logged_code_bytes = self.declared.get("code_bytes")

    # ------------------------------------------------------------------ derived facts
    @property
    def metric_name(self):
        """The submission metric: final_sliding_exact, else final_roundtrip_exact; in other formats the last
        `*_exact` result line (not pre-quantization), else the last `final_*` line with a val_bpb."""
        for k in PREFERRED_METRICS:
            if k in self.finals:
                return k
        keys = [k for k in self.finals if not k.startswith("pre")]
        exact = [k for k in keys if k.endswith("_exact")]
        return (exact or [k for k in keys if k.startswith("final_")] or [None])[-1]

    def _final(self, key):
        return num(self.finals[self.metric_name].get(key)) if self.metric_name else None

    val_loss = property(lambda self: self._final("val_loss"))
    val_bpb = property(lambda self: self._final("val_bpb"))

    def final(self, name, key="val_bpb"):
        return num(self.finals.get(name, {}).get(key))

    @property
    def seed(self):
        s = self.hparams.get("seed", self.info.get("seed"))
        return int(num(s)) if s is not None and num(s) is not None else None

    @property
    def steps(self):
        s = self.train_done.get("steps") or self.train_done.get("step")
        if s is not None:
            return int(num(s.split("/")[0]))
        pts = self.train + self.val
        return max(p["step"] for p in pts) if pts else None

    @property
    def train_ms(self):
        """Training wall-clock (evaluation excluded), as the script measured it."""
        if "train_time" in self.train_done:
            return num(self.train_done["train_time"])
        times = [p["time_ms"] for p in self.train + self.val if p["time_ms"] is not None]
        return max(times) if times else None

    @property
    def step_avg_ms(self):
        if "step_avg" in self.train_done:
            return num(self.train_done["step_avg"])
        return self.train_ms / self.steps if self.train_ms is not None and self.steps else None

    @property
    def eval_seconds(self):
        """Evaluation time of the final scoring passes (round trip + sliding), when logged."""
        s = [num(f["eval_seconds"]) for k, f in self.finals.items() if k.startswith("final_") and "eval_seconds" in f]
        if s:
            return sum(s)
        t = self.finals.get(self.metric_name, {}).get("eval_time") if self.metric_name else None
        return num(t) / 1000 if t and t.endswith("ms") else num(t)

    @property
    def world_size(self):
        w = self.versions.get("world_size", self.info.get("world_size"))
        return int(num(w)) if w is not None else None

    @property
    def device(self):
        return self.versions.get("device")

    @property
    def code_sha(self):
        return hashlib.sha256(self.code).hexdigest() if self.code is not None else None

    @property
    def config(self):
        """Hyperparameters that define the run (everything but NOT_CONFIG) plus the validation token count."""
        c = {k: v for k, v in self.hparams.items() if k not in NOT_CONFIG}
        if "val_tokens" in self.info:
            c["val_tokens (data)"] = self.info["val_tokens"]
        return c

    def label(self):
        return f"{self.name} (seed {self.seed})" if self.seed is not None else self.name


def config_diff(a: Log, b: Log, limit: int = 4) -> str:
    ca, cb = a.config, b.config
    keys = [k for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    out = ", ".join(f"{k}: {ca.get(k, '(absent)')} vs {cb.get(k, '(absent)')}" for k in keys[:limit])
    return out + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def mean_std(xs):
    """Mean and sample standard deviation (n-1; 0.0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(x, nd=8):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ToolError(f"cannot write {path}: {e.strerror}") from None


def cli(main):
    """Run main(argv); user errors become one line on stderr and exit status 1, never a traceback."""
    try:
        code = main(sys.argv[1:])
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except OSError as e:
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
