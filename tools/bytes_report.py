#!/usr/bin/env python3
"""Where an artifact's bytes go, group by group, and what other containers would make of the same integers.

Input: an artifact written by train_gpt.py; or a state dict (`torch.save(model.state_dict(), path)`) quantized here
the way the exporter rounds without Hessians (round to nearest with the preset's scale rule); or `--synthetic` (no
file), a full-size model of the preset with heavy-tailed weights (below). For each group of the artifact format (one
role over all layers: e.g. all layers' MLP down-projections; the scales; ...) it prints the raw bytes, the smallest
size each codec reaches alone (over the group's layouts; "-" where a group over 1 MiB did not run that codec in full,
its slices having ruled it out), the layout and codec train_gpt.py picks and their size.
Then the totals for the same arrays:
  one stream, zstd-22    the format before per-group packing (3): one zstd-22 frame over the header and all arrays
  one stream, brotli-11  the same stream through brotli (what several public records ship)
  per group (this file)  the artifact format 4 file that train_gpt.py writes, header included
and the order-0 entropy bound of the symbols (+ the float arrays raw), and the time to read the file back.

--synthetic: the preset's own model (PRESET=frontier: vocabulary 8192, 36 M parameters) whose matrices are replaced
by w_ij = r_i c_j t_ij: t Student-t with --dof degrees of freedom (heavy tails, as trained weights have), and
log-normal row and column scales r, c (--row-spread, --col-spread: the standard deviation of their logs), i.e. rows
and input channels of unequal size, as after training. Quantization is per-row scale invariant, so only these shapes
matter. `--like STATE.pt` takes those shapes from a trained model instead, role by role: its matrices' row and
column standard deviations (resampled to the full size) and the tails matching their kurtosis.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.common import UserError, cli  # noqa: E402


def role(name: str) -> str:
    return ".".join(p for p in name.split(".") if not p.isdigit())


def trained_statistics(path: str) -> dict:
    """Per role (layer numbers dropped): the log standard deviations of the rows and of the columns of a trained
    state dict's matrices (pooled over layers) and the Student-t degrees of freedom matching their kurtosis."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot read the state dict {path}: {e}") from None
    state = state.get("state", state)
    out = {}
    for name, w in state.items():
        if w.ndim == 2 and w.numel() > 4096:
            w = w.float()
            z = (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True).clamp_min(1e-12)
            o = out.setdefault(role(name), dict(rows=[], cols=[], kurt=[]))
            o["rows"].append(w.std(1).clamp_min(1e-12).log())
            o["cols"].append(w.std(0).clamp_min(1e-12).log())
            o["kurt"].append(float((z ** 4).mean()))
    return {r: dict(rows=torch.cat(o["rows"]), cols=torch.cat(o["cols"]),
                    dof=min(60.0, 4 + 6 / max(sum(o["kurt"]) / len(o["kurt"]) - 3, 0.1))) for r, o in out.items()}


def synthetic_state(hp, seed: int, dof: float, row_spread: float, col_spread: float, like: dict | None = None):
    """The preset's model with every quantized matrix replaced by w_ij = r_i c_j t_ij. With `like` (trained_statistics)
    a role found there draws its log row and column scales from the trained ones (resampled) and its t from the
    matching degrees of freedom; otherwise log-normal spreads and `dof`."""
    import torch
    import train_gpt as T
    torch.manual_seed(seed)
    model = T.GPT(hp.arch, embed_bits=hp["EMBED_BITS"])
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for name in T.quant_kinds(model):
        w, st = state[name], (like or {}).get(role(name))
        d = st["dof"] if st else dof
        t = torch.distributions.StudentT(d).sample(w.shape) if d > 0 else torch.randn(w.shape, generator=g)
        if st:
            pick = lambda v, n: v[torch.randint(len(v), (n,), generator=g)].exp()  # noqa: E731
            r, c = pick(st["rows"], w.size(0))[:, None], pick(st["cols"], w.size(1))[None, :]
        else:
            r = torch.exp(row_spread * torch.randn(w.size(0), 1, generator=g))
            c = torch.exp(col_spread * torch.randn(1, w.size(1), generator=g))
        state[name] = (0.02 * r * c * t).float()
    return model, state


def load_entries(a):
    """(entries, config, file blob or None, hp) for the chosen input."""
    import torch
    import train_gpt as T
    if a.synthetic or a.input.endswith(".pt"):
        env = {"PRESET": a.preset, "VOCAB_SIZE": str(a.vocab_size)}
        if a.smoke:
            env["SMOKE"] = "1"
        hp = T.resolve_config(env)
        if a.synthetic:
            like = trained_statistics(a.like) if a.like else None
            model, state = synthetic_state(hp, a.seed, a.dof, a.row_spread, a.col_spread, like)
        else:
            model = T.GPT(hp.arch, embed_bits=hp["EMBED_BITS"])
            try:
                state = torch.load(a.input, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, ValueError) as e:
                raise UserError(f"cannot read the state dict {a.input}: {e}") from None
            try:
                model.load_state_dict(state)
            except RuntimeError:
                raise UserError(f"{a.input} does not match PRESET={a.preset} VOCAB_SIZE={a.vocab_size} "
                                "(set --preset/--vocab-size/--smoke to the run that saved it)") from None
        entries, _ = T.quantize_state(state, T.quant_kinds(model), hp)
        return entries, model.stored_config(), None
    try:
        with open(a.input, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise UserError(f"cannot read {a.input}: {e.strerror}") from None
    meta, entries = T.unpack_artifact(blob, a.input)
    return entries, meta["config"], blob


def report(entries, config, workers=None) -> dict:
    """Pack with train_gpt's Packer and measure the alternatives on the same arrays."""
    import brotli
    import zstandard
    import train_gpt as T
    pack = T.Packer(workers)
    t0 = time.perf_counter()
    blob = pack(entries, config)
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, back = T.unpack_artifact(blob)
    T.dequantize(back)
    load_s = time.perf_counter() - t0
    members = {}
    for i, e in enumerate(entries):
        m = {k: v for k, v in e.items() if not hasattr(v, "dtype")}
        for key, (dt, _) in T.array_specs(m).items():
            members.setdefault(T.group_of(m, key, dt), []).append(e[key])
    rows = []
    for g, arrays in sorted(members.items()):
        sizes = {}
        for layout in T.LAYOUTS["int" if arrays[0].dtype == T.torch.int8 else "float"]:
            digest = hashlib.sha256(T.group_bytes(arrays, layout)).digest()
            for codec in T.CODECS:
                if (layout, codec, digest) in pack.blobs:
                    n = len(pack.blobs[layout, codec, digest])
                    sizes[codec] = min(sizes.get(codec, n), n)
        layout, codec = pack.plan[g]
        raw = sum(a.numel() * a.element_size() for a in arrays)
        chosen = len(pack.blobs[layout, codec, hashlib.sha256(T.group_bytes(arrays, layout)).digest()])
        rows.append(dict(group=g, raw=raw, **sizes, choice=f"{layout}/{codec}", bytes=chosen))
    stream = b"".join(T.group_bytes([e[k]], "rows") for e in entries for k in T.array_specs(e))
    header = len(blob) - sum(r["bytes"] for r in rows)
    return dict(rows=rows, file=len(blob), header=header, pack_s=pack_s, load_s=load_s,
                zstd_stream=len(zstandard.ZstdCompressor(level=22).compress(stream)) + header,
                brotli_stream=len(brotli.compress(stream, quality=11, lgwin=24)) + header,
                h0=T.entropy_bytes(entries))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?", help="an artifact (.ptz) or a state dict (.pt); omit with --synthetic")
    ap.add_argument("--synthetic", action="store_true", help="a full-size model of --preset with heavy-tailed weights")
    ap.add_argument("--preset", default="frontier", help="for .pt and --synthetic: the PRESET (default frontier)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="for .pt and --synthetic: VOCAB_SIZE (default 8192)")
    ap.add_argument("--smoke", action="store_true", help="for .pt and --synthetic: the SMOKE=1 sizes")
    ap.add_argument("--seed", type=int, default=0, help="--synthetic: random seed (default 0)")
    ap.add_argument("--dof", type=float, default=4.0, help="--synthetic: Student-t degrees of freedom (default 4; 0 = Gaussian)")
    ap.add_argument("--row-spread", type=float, default=0.3, help="--synthetic: std of log row scales (default 0.3)")
    ap.add_argument("--col-spread", type=float, default=0.3, help="--synthetic: std of log input-channel scales (default 0.3)")
    ap.add_argument("--like", metavar="STATE.pt", help="--synthetic: draw each role's row and column scales and tails from "
                    "this trained state dict's matrices of the same role (e.g. a CPU-proxy run's)")
    ap.add_argument("--workers", type=int, default=None, help="compression threads (default: every core)")
    a = ap.parse_args(argv)
    if bool(a.input) == a.synthetic:
        raise UserError("give an artifact or a state dict, or --synthetic (not both, not neither)")
    if a.input and not os.path.exists(a.input):
        raise UserError(f"{a.input} does not exist")
    entries, config, _ = load_entries(a)
    r = report(entries, config, a.workers)
    w = max(len(x["group"]) for x in r["rows"])
    print(f"{'group':<{w}} {'raw':>10} {'zstd':>10} {'brotli':>10} {'lzma':>10}  {'chosen':<14} {'bytes':>10}")
    for x in r["rows"]:
        sizes = " ".join(f"{x[c]:>10,}" if c in x else f"{'-':>10}" for c in ("zstd", "brotli", "lzma"))
        print(f"{x['group']:<{w}} {x['raw']:>10,} {sizes}  {x['choice']:<14} {x['bytes']:>10,}")
    z, b, f = r["zstd_stream"], r["brotli_stream"], r["file"]
    print(f"{'header (compressed JSON + fixed fields)':<{w + 59}} {r['header']:>10,}")
    print(f"one stream, zstd-22 (format 3):   {z:>12,}")
    print(f"one stream, brotli-11:            {b:>12,}  ({100 * (b - z) / z:+.2f}% vs zstd stream)")
    print(f"per group (format 4, this file):  {f:>12,}  ({100 * (f - z) / z:+.2f}% vs zstd stream, {100 * (f - b) / b:+.2f}% vs brotli stream)")
    print(f"order-0 entropy bound:            {r['h0']:>12,}  (symbols at their order-0 entropy + scales and floats raw)")
    print(f"pack_seconds:{r['pack_s']:.1f} (every layout x codec tried) read_and_dequantize_seconds:{r['load_s']:.2f}")
    return 0


if __name__ == "__main__":
    cli(main)
