#!/usr/bin/env python3
"""Pack a training script into a self-extracting copy that counts far fewer code bytes.

The packed file is a short stub holding the script's exact source, compressed (whichever of lzma, zlib, bz2 is
smallest) and base85-encoded. Run, it decompresses the source and executes it in its own module namespace, compiled
under its own path: `__name__` is "__main__" when run as a program (torchrun included) and the module name when
imported, and `__file__` is the packed file, so a train_gpt.py that logs and counts its own file logs and counts the
packed bytes — what a submission ships. The source is also registered with linecache, so tracebacks and inspect
show the real lines. `--unpack` recovers the source byte for byte (reviewers: this is how to read a packed record).
"""
from __future__ import annotations

import argparse
import base64
import bz2
import hashlib
import lzma
import os
import re
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import UserError, cli, write_atomic  # noqa: E402

_CODECS = {"lzma": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), "zlib": lambda b: zlib.compress(b, 9),
           "bz2": lambda b: bz2.compress(b, 9)}
_STUB = ('# self-extracting {name} ({codec}+base85 of {n} bytes, sha256 {sha}); source: python tools/pack_code.py --unpack FILE\n'
         'import {codec} as _z,base64 as _b,linecache as _c\n'
         '_s=_z.decompress(_b.b85decode("{data}"))\n'
         '_c.cache[__file__]=(len(_s),None,_s.decode().splitlines(True),__file__)\n'
         'exec(compile(_s,__file__,"exec"))\n')
_PACKED = re.compile(rb'import (lzma|zlib|bz2) as _z,base64 as _b,linecache as _c\n_s=_z\.decompress\(_b\.b85decode\("([^"]*)"\)\)\n')


def pack(src: bytes, name: str = "train_gpt.py") -> bytes:
    """The smallest self-extracting stub for `src` (deterministic)."""
    try:
        compile(src, name, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        raise UserError(f"{name} does not compile ({e.__class__.__name__}: {e}); nothing packed") from None
    best = min(((c, base64.b85encode(f(src))) for c, f in _CODECS.items()), key=lambda x: len(x[1]))
    out = _STUB.format(name=os.path.basename(name), codec=best[0], n=len(src), sha=hashlib.sha256(src).hexdigest()[:16],
                       data=best[1].decode()).encode()
    assert unpack(out) == src
    return out


def unpack(data: bytes) -> bytes | None:
    """The source inside a packed file, or None if `data` is not one."""
    m = _PACKED.search(data)
    if not m:
        return None
    try:
        return {"lzma": lzma, "zlib": zlib, "bz2": bz2}[m.group(1).decode()].decompress(base64.b85decode(m.group(2)))
    except (ValueError, lzma.LZMAError, zlib.error, OSError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("script", help="the script to pack (or, with --unpack, a packed file)")
    ap.add_argument("-o", "--out", required=True, help="where to write the packed file (or the recovered source)")
    ap.add_argument("--unpack", action="store_true", help="recover the exact source from a packed file")
    a = ap.parse_args(argv)
    with open(a.script, "rb") as f:
        src = f.read()
    if a.unpack:
        out = unpack(src)
        if out is None:
            raise UserError(f"{a.script} is not a file written by tools/pack_code.py")
        write_atomic(a.out, out)
        print(f"unpacked {a.script} ({len(src)} bytes) -> {a.out} ({len(out)} bytes)")
        return 0
    if unpack(src) is not None:
        raise UserError(f"{a.script} is already packed")
    out = pack(src, a.script)
    write_atomic(a.out, out)
    print(f"packed {a.script}: {len(src)} -> {len(out)} bytes ({100 * (1 - len(out) / len(src)):.1f}% smaller) -> {a.out}")
    return 0


if __name__ == "__main__":
    cli(main)
