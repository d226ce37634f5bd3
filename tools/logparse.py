"""The one parser of training logs shared by the tools (check_record, significance, plot_log, make_record, gpu_check).

Reads this project's logs (LOG_DIR/RUN_ID.txt written by train_gpt.py: a `==== code: ... ====` block holding the
script byte for byte, then `key:value` lines) and the logs of openai/parameter-golf records of every era, by the shape
of their lines rather than by a list of names:
- the script text followed by a line of 100 '=', or a plain stdout capture (nvidia-smi tables included);
- `key:value` and `key: value` tokens, never read by position; times in ms, s or m (`train_time: 3.4m`);
- step lines `step:N/T ...`, `step: N/T ...` or a bare `N/T train_loss: ...`;
- score lines under any name that carry `val_loss:` and `val_bpb:` (`final_int8_zlib_roundtrip_exact`,
  `final_int6_sliding_window_s64_exact`, `quantized_sliding_window`, `quantized_ttt_phased`, `legal_ttt_exact`,
  `diagnostic pre-quantization post-ema`, this project's `final_sliding_exact`, ...), each classified by its name as
  pre-quant, round trip, sliding or test-time-trained (KINDS); `eval_time:` on any of them, `total_eval_time:`;
- hyperparameters as this project's block after `run_id:` or an indented `Hyperparameters:` block (`  seed: 42`);
- `train_done ...` / `stopping_early: wallclock_cap train_time: ...`, `Serialized model ...: N bytes`, `Code size: N
  bytes`, `Code size (compressed|uncompressed): N`, `Total submission size ...: N`, a size line ending in `OVER`.
The submission metric is chosen on purpose: the last evaluation the log reports in the order test-time-trained >
sliding > round trip (within a kind the last line, the `*_exact` one where a rounded twin exists); never pre-quant.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import statistics
import string

from data.common import CODE_END, CODE_HEAD, FREE_SETTINGS, LIMIT_BYTES, LIMIT_SECONDS, UserError

LIMIT = LIMIT_BYTES  # code + artifact bytes, decimal
RECORD_SECONDS = LIMIT_SECONDS  # training (and, separately, evaluation) budget of the record track
TRACKS = ("10min_16mb", "non_record_16mb")
KINDS = ("pre", "roundtrip", "sliding", "ttt")  # score kinds, the submission metric is the best present of the last three
KIND_NAMES = dict(pre="pre-quant", roundtrip="round trip", sliding="sliding window", ttt="test-time-trained")
# Hyperparameter lines that are not part of a run's configuration, listed once here: train_gpt.py's FREE_SETTINGS
# (identity, machine paths, log and checkpoint cadence, kernels), the seed (it differs between the runs of one
# configuration), the run-identity fields other scripts log, and any name shaped like a path (PATH_SUFFIXES): where a
# run wrote its log or artifact, or found its data, does not change what it computes.
RUN_IDENTITY = ("seed", "run_id", "run_name", "logfile", "log_file", "log_path", "eval_only_path", "eval_only_quantized_path")
PATH_SUFFIXES = ("_path", "_dir", "_file", "_files", "_glob", "_pattern", "_prefix")
NOT_CONFIG = {k.lower() for k in FREE_SETTINGS} | set(RUN_IDENTITY)


def is_config(key: str) -> bool:
    """Does a logged setting change what a run computes? False for NOT_CONFIG and path-shaped names (PATH_SUFFIXES)."""
    k = key.lower()
    return k not in NOT_CONFIG and not k.endswith(PATH_SUFFIXES)

_FIELDS = {"name": r"(.+?)", "n": r"(\d+)", "sha": r"([0-9a-f]{64})"}  # CODE_HEAD's fields: script name, bytes, sha256


def _head_pattern(head: str) -> re.Pattern:
    """The regex of a code-block header line written as CODE_HEAD.format(name=..., n=..., sha=...)."""
    parts = [re.escape(lit) + (_FIELDS[field] if field is not None else "") for lit, field, _, _ in string.Formatter().parse(head)]
    return re.compile(("".join(parts) + "\n").encode())


_HEAD = _head_pattern(CODE_HEAD)
CODE_HEAD_PREFIX = CODE_HEAD.split("{", 1)[0]  # "==== code: ": how a log of this project starts
_TAIL = f"\n{CODE_END}\n".encode()
_UPSTREAM_RULE = b"\n" + b"=" * 100 + b"\n"
# `key:value` / `key=value`, or `key: value` where the value holds no ':' (so `features: attention:sdpa` keeps both)
_TOKEN = re.compile(r"(?<!\S)([A-Za-z_][\w./]*)[:=](\S+)|(?<!\S)([A-Za-z_][\w./]*): ([^\s:]+)(?=\s|$)")
_HPARAM = re.compile(r"([a-z][a-z0-9_]*):(.*)")
_INDENTED = re.compile(r"\s+([A-Za-z_]\w*): ?(.*)")
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_STEP = re.compile(r"(?:step:\s?)?(\d+)/(\d+)(?=\s|$)")
_SCORE = re.compile(r"(?:^|\s)val_loss:\s?(\S+)\s.*?\bval_bpb:\s?(\S+)")
# upstream scripts that reuse the round-trip line's name for a sliding-window final evaluation announce it first
_SLIDING_MODE = re.compile(r"^final_eval_mode:\s*sliding|sliding[ _-]window eval", re.I)
_SMI_GPU = re.compile(r"^\|\s+\d+\s+((?:NVIDIA|Tesla)\b.*?)\s+(?:On|Off)\s+\|")
_OVER = re.compile(r"(?i:size|bytes|limit).*\bOVER\b")
_STAMP = re.compile(r"^\d{9,11}\.\d{1,6} ")  # a console capture with a Unix time before each line (`1776142360.538 ...`)


def num(v):
    """'374019ms' -> 374019.0; None when the value holds no number."""
    m = _NUM.match(v) if isinstance(v, str) else None
    return float(m.group()) if m else None


def value(v: str):
    """A token's value as a number where it is one ('1234' -> 1234, '12.5ms' -> 12.5, 'nan' -> nan), else the string."""
    if v.lower() in ("nan", "inf", "-inf", "+inf"):
        return float(v)
    m = _NUM.match(v)
    if not m or v[m.end():] not in ("", "ms", "s"):
        return v
    return int(m.group()) if re.fullmatch(r"[-+]?\d+", m.group()) else float(m.group())


def ms(v):
    """A logged duration in milliseconds: '588136ms', '12.5s', '3.4m' (minutes); a bare number is taken as ms."""
    x = num(v)
    if x is None:
        return None
    unit = v[_NUM.match(v).end():].strip().lower()
    return x * {"s": 1000.0, "m": 60000.0, "min": 60000.0, "h": 3600000.0}.get(unit, 1.0)


def tokens(line: str) -> dict:
    """Every `key:value`, `key: value` and `key=value` token of a line (values as strings)."""
    return {a or c: b or d for a, b, c, d in _TOKEN.findall(line)}


def score_kind(name: str) -> str:
    """pre / roundtrip / sliding / ttt from a score line's name."""
    n = name.lower()
    if "ttt" in n:
        return "ttt"
    if re.search(r"pre[-_ ]?quant|pre[-_ ]?ema|prequant|\bpre\b|^pre_", n):
        return "pre"
    if re.search(r"slid|window|stride|_s\d+", n):
        return "sliding"
    return "roundtrip"


class Log:
    """Facts of one training log. Missing facts are None (upstream logs lack many)."""

    def __init__(self, path: str, raw: bytes | None = None):
        self.path, self.name = path, os.path.basename(path)
        if raw is None:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise UserError(f"cannot read log {path}: {e.strerror}") from None
        self.raw, self.code, self.code_name, self.declared = raw, None, None, {}
        self.format = "upstream"
        heads = list(_HEAD.finditer(raw))
        if len(heads) > 1:
            raise UserError(f"{path} holds {len(heads)} runs (a reused RUN_ID appends to the same log); keep one run per file")
        if heads:
            h = heads[0]
            name, n, sha = h.group(1).decode(errors="replace"), int(h.group(2)), h.group(3).decode()
            code, rest = raw[h.end():h.end() + n], raw[h.end() + n:]
            if len(code) != n or not rest.startswith(_TAIL) or hashlib.sha256(code).hexdigest() != sha:
                raise UserError(f"{path}: the logged code block is damaged (length, sha256 or end marker does not match its header)")
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

    @classmethod
    def from_lines(cls, lines, name: str = "(lines)") -> "Log":
        """A log from lines already read (a console capture): no code block is looked for."""
        lg = cls.__new__(cls)
        lg.path = lg.name = name
        lg.raw, lg.code, lg.code_name, lg.declared, lg.format = None, None, None, {}, "upstream"
        lg._parse(list(lines))
        return lg

    def _parse(self, lines):
        self.lines = [_STAMP.sub("", line.rstrip("\r\n"), count=1) for line in lines]  # the text lines, no code block
        self.hparams, self.versions, self.run_id, self.errors = {}, {}, None, []
        self.train, self.val, self.finals, self.scores, self.info = [], [], {}, [], {}
        self.last = {}  # head word of a line (before ':' or ' ') -> the tokens of the last line with that head
        self.artifact_bytes = self.logged_total = self.logged_code_bytes = self.total_eval_ms = None
        self.code_sizes, self.over_lines, self.gpus = {}, [], []
        self.train_done = {}
        in_hp = indented = sliding_mode = False
        for line in self.lines:
            if in_hp:
                m = _INDENTED.fullmatch(line) if indented else _HPARAM.fullmatch(line)
                if m and m.group(1) != "model_params":
                    self.hparams[m.group(1)] = m.group(2).strip()
                    continue
                in_hp = False
            head = line.split(" ", 1)[0]
            t = tokens(line)
            key = re.split(r"[:\s]", line.strip(), maxsplit=1)[0]
            if key:
                self.last[key] = t
            score = _SCORE.search(line)
            step = _STEP.match(head if head != "step:" else line)
            if _SLIDING_MODE.search(line) and not score:
                sliding_mode = True  # a final evaluation announced as sliding, its score line keeping a round-trip name
            if line.startswith("run_id:") and not self.hparams and self.run_id is None:
                self.run_id, in_hp, indented = line[7:].strip(), True, False
            elif line.strip() == "Hyperparameters:" and not self.hparams:
                in_hp, indented = True, True
            elif line.startswith("python:") and "torch" in t:
                self.versions = dict(t)
                if m := re.search(r" device:(.*?) world_size:", line):  # GPU names hold spaces
                    self.versions["device"] = m.group(1)
            elif line.startswith("error: "):
                self.errors.append(line[7:])
            elif step and ("train_loss" in t or "val_bpb" in t or ("loss" in t and "t" in t)):
                if "train_loss" not in t and "val_bpb" not in t:  # terse step lines: `step:500/50000 loss:3.68 t:77540ms avg:155.1ms`
                    t = dict(t, train_loss=t["loss"], train_time=t["t"], **({"step_avg": t["avg"]} if "avg" in t else {}))
                p = dict(step=int(step.group(1)), total=float(step.group(2)), time_ms=ms(t["train_time"]) if "train_time" in t else None)
                if "train_loss" in t:
                    self.train.append(dict(p, loss=num(t["train_loss"]), step_avg_ms=ms(t["step_avg"]) if "step_avg" in t else None,
                                           lr_mult=num(t.get("lr_mult"))))
                if "val_bpb" in t:
                    self.val.append(dict(p, loss=num(t.get("val_loss")), bpb=num(t["val_bpb"])))
            elif score and num(score.group(1)) is not None and num(score.group(2)) is not None:
                # the line's name, without `key:value` settings printed before the score (`..._eval_exact stride:64 val_loss:`)
                name = re.sub(r"(?:\s+[A-Za-z_]\w*[:=]\S*)+$", "", line[:score.start()].strip()) or "val"
                self.finals[name] = dict(t, _line=line)
                kind = score_kind(name)
                kind = "sliding" if kind == "roundtrip" and sliding_mode else kind
                self.scores.append(dict(name=name, kind=kind, val_loss=num(score.group(1)), val_bpb=num(score.group(2)),
                                        eval_ms=ms(t["eval_time"]) if "eval_time" in t else (
                                            1000 * num(t["eval_seconds"]) if "eval_seconds" in t else None), line=line))
            elif head in ("train_done", "stopping_early:"):
                self.train_done = t
            elif head == "artifact:" and (m := re.search(r"\bbytes=(\d+)", line)):
                self.artifact_bytes = int(m.group(1))
            elif head.startswith("artifact:") and (m := re.search(r"\bcode:(\d+)\b", line)):
                self.code_sizes["plain"] = int(m.group(1))  # `artifact:15.60MB binary:... fp:... code:N` (size in MB only)
            elif m := re.match(r"budget:(\d+)/(\d+)\b", line):
                self.logged_total = int(m.group(1))  # `budget:TOTAL/LIMIT (...) FITS`
            elif m := re.match(r"Serialized model[^:]*: (\d+) bytes", line):
                self.artifact_bytes = int(m.group(1))  # the last one is the compressed model
            elif m := re.match(r"(?:total_submission_bytes:|Total submission size[^:]*: ?)(\d+)", line):
                self.logged_total = int(m.group(1))
            elif m := re.match(r"(?:code_bytes:|Code size(?: \((\w+)\))?: ?)(\d+)", line):
                self.code_sizes[m.group(1) or "plain"] = int(m.group(2))
            elif head.startswith("total_eval_time:"):
                self.total_eval_ms = ms(t["total_eval_time"])
            elif head.startswith(("train_shards:", "model_params:")):
                self.info.update(t)
            elif head == "features:":
                self.info["features"] = line[10:]
            elif gpu := _SMI_GPU.match(line):
                self.gpus.append(gpu.group(1).strip())
            if _OVER.search(line) and not line.startswith(("step", "error")):
                self.over_lines.append(line.strip())
            if "seed" in t and "seed" not in self.info and not self.hparams:
                self.info["seed"] = t["seed"]  # upstream: the first seed:N token
            for k in ("world_size", "max_wallclock_seconds"):  # upstream: inline tokens of a settings line
                if k in t and k not in self.info:
                    self.info[k] = t[k]
        if self.code_sizes:  # what counts: the compressed (self-extracting) script when the log gives both
            self.logged_code_bytes = self.code_sizes.get("compressed", self.code_sizes.get("plain", max(self.code_sizes.values())))
        else:
            self.logged_code_bytes = self.declared.get("code_bytes")
        self.artifact_derived = False
        if self.artifact_bytes is None and self.logged_total and self.logged_code_bytes:
            # a log that prints only the total and the code size (`budget:TOTAL/LIMIT`, `code:N`): the artifact is the rest
            self.artifact_bytes, self.artifact_derived = self.logged_total - self.logged_code_bytes, True

    def lines_with(self, prefix: str) -> list[str]:
        """The lines that start with `prefix`, in order."""
        return [line for line in self.lines if line.startswith(prefix)]

    # ------------------------------------------------------------------ derived facts
    @property
    def error(self):
        return self.errors[-1] if self.errors else None

    def score(self, kind: str) -> dict | None:
        """The last score line of a kind; of a rounded line and its `*_exact` twin, the exact one."""
        lines = [s for s in self.scores if s["kind"] == kind]
        rounded = {s["name"] + "_exact": s for s in lines}
        lines = [s for s in lines if s["name"] + "_exact" not in {x["name"] for x in lines}]
        if not lines:
            return None
        s = lines[-1]
        twin = rounded.get(s["name"])
        return dict(s, eval_ms=twin["eval_ms"]) if s["eval_ms"] is None and twin else s  # the exact line has no timing

    @property
    def metric(self) -> dict | None:
        """The submission metric: the last evaluation reported, test-time-trained > sliding > round trip."""
        return next((s for s in map(self.score, ("ttt", "sliding", "roundtrip")) if s), None)

    @property
    def metric_name(self):
        return self.metric["name"] if self.metric else None

    @property
    def metric_kind(self):
        return self.metric["kind"] if self.metric else None

    val_loss = property(lambda self: self.metric["val_loss"] if self.metric else None)
    val_bpb = property(lambda self: self.metric["val_bpb"] if self.metric else None)

    def final(self, name, key="val_bpb"):
        """A score by line name, or by kind (KINDS)."""
        s = self.score(name) if name in KINDS else next((s for s in reversed(self.scores) if s["name"] == name), None)
        return s[key] if s else None

    @property
    def nats_per_bpb(self):
        """val_loss / val_bpb = ln 2 x bytes per token: a fingerprint of the tokenizer (and validation text)."""
        m = self.metric
        return m["val_loss"] / m["val_bpb"] if m and m["val_bpb"] else None

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
            return ms(self.train_done["train_time"])
        times = [p["time_ms"] for p in self.train + self.val if p["time_ms"] is not None]
        return max(times) if times else None

    @property
    def step_avg_ms(self):
        if "step_avg" in self.train_done:
            return ms(self.train_done["step_avg"])
        return self.train_ms / self.steps if self.train_ms is not None and self.steps else None

    @property
    def eval_seconds(self):
        """Evaluation time as the log reports it: `total_eval_time`, else this project's final passes (round trip +
        sliding), else the submission metric's own `eval_time`."""
        if self.total_eval_ms is not None:
            return self.total_eval_ms / 1000
        s = [num(f["eval_seconds"]) for k, f in self.finals.items() if k.startswith("final_") and "eval_seconds" in f]
        if s:
            return sum(s)
        return self.metric["eval_ms"] / 1000 if self.metric and self.metric["eval_ms"] is not None else None

    @property
    def wallclock_cap(self):
        """MAX_WALLCLOCK_SECONDS as logged (hyperparameter block or an inline token), in seconds."""
        return num(self.hparams.get("max_wallclock_seconds", self.info.get("max_wallclock_seconds")))

    @property
    def world_size(self):
        w = self.versions.get("world_size", self.hparams.get("world_size", self.info.get("world_size")))
        return int(num(w)) if w is not None and num(w) is not None else (len(self.gpus) or None)

    @property
    def device(self):
        return self.versions.get("device") or (self.gpus[0] if self.gpus else None)

    @property
    def code_sha(self):
        return hashlib.sha256(self.code).hexdigest() if self.code is not None else None

    @property
    def raw_sha(self):
        return hashlib.sha256(self.raw).hexdigest() if self.raw is not None else None

    @property
    def config(self):
        """Hyperparameters that define the run (every one is_config accepts) plus the validation token count."""
        c = {k: v for k, v in self.hparams.items() if is_config(k)}
        if "val_tokens" in self.info:
            c["val_tokens (data)"] = self.info["val_tokens"]
        return c

    def label(self):
        return f"{self.name} (seed {self.seed})" if self.seed is not None else self.name


def run_log(path: str, console=()) -> Log:
    """A run's facts from its log file; from its console lines (`console`) where the file is missing, empty or its
    code block is damaged (a run that failed early still printed why)."""
    try:
        if os.path.getsize(path):
            return Log(path)
    except (OSError, UserError):
        pass
    return Log.from_lines(console, name=os.path.basename(path))


def unique_logs(logs: list[Log]) -> tuple[list[Log], list[str]]:
    """Byte-identical copies (a train.log copied to train_seed1337.log) count once -> (logs, notes)."""
    seen, out, notes = {}, [], []
    for lg in logs:
        key = lg.raw_sha
        if key is not None and key in seen:
            notes.append(f"{lg.name} is a byte-identical copy of {seen[key].name}; counted once")
        else:
            seen[key] = lg
            out.append(lg)
    return out, notes


def ignored_differences(logs: list[Log]) -> list[str]:
    """Logged settings that differ between the logs but do not change the result (not is_config): run identity, paths."""
    keys = set().union(*(lg.hparams for lg in logs)) if logs else set()
    return sorted(k for k in keys if not is_config(k) and k != "seed" and len({lg.hparams.get(k) for lg in logs}) > 1)


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
