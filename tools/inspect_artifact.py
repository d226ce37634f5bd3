#!/usr/bin/env python3
"""Where the bytes of an artifact go: one row per tensor, then totals.

Columns: scheme (int6/int8, or int5 after a budget fit, per-row with fp16 scales; fp16; fp32), shape, `bytes`
stored (symbols + scales, before compression), `zstd` = zstd-22 of that tensor's arrays alone, `bits/val` = zstd-22 of its symbols alone in bits per
value, `H0` = order-0 entropy bound of its symbols (+ raw scales; train_gpt.entropy_bytes) and the same bound in
bits per value, the mean chosen scale candidate (a clip fraction of the row max; with QUANT_SCALE=sdclip, k row
standard deviations) and the reconstruction MSE against the float weights (in weight space, also under GPTQ).
The file itself packs arrays by group (one role over all layers), each group in its smallest layout and codec, so its
size differs from the per-tensor zstd sum: `tools/bytes_report.py` shows the groups. Reading uses
train_gpt.unpack_artifact: anything else is refused.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.common import UserError, cli  # noqa: E402


def rows(entries, level=22):
    import torch
    import zstandard
    import train_gpt as tg
    z = zstandard.ZstdCompressor(level=level)
    raw = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # noqa: E731
    out = []
    for e in entries:
        arrays = [e[k] for k in tg.array_specs(e)]  # symbols + scales (+ LQER factors), or the float data
        sym = raw(arrays[0])
        numel = arrays[0].numel()
        quant = "q" in e
        h0_sym = tg.entropy_bytes([dict(q=e["q"], scale=e["scale"][:0])]) if quant else None
        out.append(dict(name=e["name"], scheme=e["scheme"], shape="x".join(map(str, e["shape"])) or "scalar", numel=numel,
                        bytes=sum(len(raw(a)) for a in arrays), zstd=len(z.compress(b"".join(raw(a) for a in arrays))),
                        bits=8 * len(z.compress(sym)) / max(numel, 1), h0=tg.entropy_bytes([e]),
                        h0_bits=8 * h0_sym / max(numel, 1) if quant else None, clip=e.get("clip"), mse=e.get("mse")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="an artifact written by train_gpt.py (LOG_DIR/RUN_ID.ptz)")
    ap.add_argument("--sort", choices=["file", "bytes", "zstd"], default="file", help="row order (default: as stored)")
    ap.add_argument("--level", type=int, default=22, choices=range(1, 23), metavar="1..22",
                    help="zstd level of the per-tensor columns (default 22, as the exporter; lower is faster)")
    a = ap.parse_args(argv)
    try:
        with open(a.artifact, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise UserError(f"cannot read {a.artifact}: {e.strerror}") from None
    import train_gpt as tg
    meta, entries = tg.unpack_artifact(blob, a.artifact)  # its UserError is a one-line error too (data.common.cli)
    rs = rows(entries, a.level)
    if a.sort != "file":
        rs.sort(key=lambda r: -r[a.sort])
    cfg = " ".join(f"{k.lower()}={v}" for k, v in meta.get("config", {}).items())
    print(f"artifact: {a.artifact} bytes={len(blob)} format={tg.ARTIFACT_VERSION} groups={len(meta['groups'])} tensors={len(entries)} sha256={meta['sha256'][:16]}")
    print(f"config: {cfg}")
    w = max([len(r["name"]) for r in rs] + [6])
    print(f"{'tensor':<{w}} {'scheme':<6} {'shape':>11} {'bytes':>10} {'zstd':>10} {'bits/val':>8} {'H0':>10} {'H0 b/val':>8} {'clip':>6} {'mse':>10}")
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for r in rs:
        print(f"{r['name']:<{w}} {r['scheme']:<6} {r['shape']:>11} {r['bytes']:>10} {r['zstd']:>10} {r['bits']:>8.3f} {r['h0']:>10} "
              f"{f(r['h0_bits'], '8.3f'):>8} {f(r['clip'], '6.4f'):>6} {f(r['mse'], '10.3e'):>10}")
    print("by scheme:")
    for s in sorted({r["scheme"] for r in rs}):
        g = [r for r in rs if r["scheme"] == s]
        n = sum(r["numel"] for r in g)
        print(f"  {s:<6} tensors={len(g)} values={n} bytes={sum(r['bytes'] for r in g)} zstd={sum(r['zstd'] for r in g)} "
              f"zstd bits/val (scales included)={8 * sum(r['zstd'] for r in g) / max(n, 1):.3f} H0={sum(r['h0'] for r in g)}")
    total_h0 = tg.entropy_bytes(entries)
    print(f"total: values={sum(r['numel'] for r in rs)} bytes={sum(r['bytes'] for r in rs)} zstd(per tensor)={sum(r['zstd'] for r in rs)} "
          f"H0={total_h0} file={len(blob)} (header + one blob per group; file/H0={len(blob) / max(total_h0, 1):.4f})")
    return 0


if __name__ == "__main__":
    cli(main)
