#!/usr/bin/env python3
"""Pack a training script into a self-extracting copy that counts far fewer code bytes.

The packed file is a short stub holding the script's source, compressed (whichever of lzma, zlib, bz2 is smallest) and
base85-encoded. Run, it decompresses the source and executes it in its own module namespace, compiled under its own
path: `__name__` is "__main__" when run as a program (torchrun included) and the module name when imported, and
`__file__` is the packed file, so a train_gpt.py that logs and counts its own file logs and counts the packed bytes —
what a submission ships. The source is also registered with linecache, so tracebacks and inspect show its lines.

Two modes, and both sizes are always reported:
  exact (default)  the source byte for byte; `--unpack` recovers it exactly (reviewers: this is how to read a packed
                   record).
  --minify         the source without docstrings, comments and blank lines (what later public records counted as
                   their code size: a minified, compressed copy of readable code). Nothing else changes: the packed
                   file's decoded source must parse to the same syntax tree as the original with its docstrings
                   removed (a body left empty gets `pass`), or nothing is written. A script that reads `__doc__`
                   keeps its docstrings. `--unpack` gives the minified source.
"""
from __future__ import annotations

import argparse
import ast
import base64
import bz2
import hashlib
import io
import lzma
import os
import re
import sys
import tokenize
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import UserError, cli, write_atomic  # noqa: E402

_CODECS = {"lzma": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), "zlib": lambda b: zlib.compress(b, 9),
           "bz2": lambda b: bz2.compress(b, 9)}
_STUB = ('# self-extracting {name} ({codec}+base85 of {n} bytes{how}, sha256 {sha}); source: python tools/pack_code.py --unpack FILE\n'
         'import {codec} as _z,base64 as _b,linecache as _c\n'
         '_s=_z.decompress(_b.b85decode("{data}"))\n'
         '_c.cache[__file__]=(len(_s),None,_s.decode().splitlines(True),__file__)\n'
         'exec(compile(_s,__file__,"exec"))\n')
_PACKED = re.compile(rb'import (lzma|zlib|bz2) as _z,base64 as _b,linecache as _c\n_s=_z\.decompress\(_b\.b85decode\("([^"]*)"\)\)\n')


def _docstring_owners(tree: ast.AST) -> list:
    """Module, class and function nodes whose body starts with a docstring."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
            and isinstance(n.body[0].value.value, str)]


def _reads_doc(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "__doc__" or isinstance(n, ast.Attribute) and n.attr == "__doc__"
               for n in ast.walk(tree))


def stripped_tree(src: bytes) -> str:
    """The syntax tree (ast.dump) `src` minifies to: its docstrings removed, `pass` in a body left empty (none removed
    when the script reads `__doc__`). Comments and blank lines are not in a syntax tree."""
    tree = ast.parse(src)
    if not _reads_doc(tree):
        for n in _docstring_owners(tree):
            n.body = n.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def minify(src: bytes) -> bytes:
    """`src` without docstrings, comments and blank lines, checked: its syntax tree is stripped_tree(src), else a
    UserError. Lines inside multi-line strings are kept as they are."""
    try:
        text = src.decode("utf-8")
        tree = ast.parse(src)
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError) as e:
        raise UserError(f"cannot minify: the script does not parse ({e.__class__.__name__}: {e})") from None
    lines = re.split(r"(?<=\n)", text)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    at = lambda row, col: starts[row - 1] + col  # noqa: E731  (1-based row, character column)
    char_col = lambda row, byte_col: len(lines[row - 1].encode()[:byte_col].decode(errors="ignore"))  # noqa: E731
    edits, keep = [], set()  # (start, end, replacement) in characters; rows that start inside a string
    for t in toks:
        if t.type == tokenize.COMMENT:
            edits.append((at(*t.start), at(*t.end), ""))
        elif t.end[0] > t.start[0] and tokenize.tok_name[t.type] in ("STRING", "FSTRING_MIDDLE", "FSTRING_END"):
            keep.update(range(t.start[0] + 1, t.end[0] + 1))
    if not _reads_doc(tree):
        for n in _docstring_owners(tree):
            d = n.body[0]
            a, b = at(d.lineno, char_col(d.lineno, d.col_offset)), at(d.end_lineno, char_col(d.end_lineno, d.end_col_offset))
            edits.append((a, b, ("pass" if len(n.body) == 1 else "") + "\n" * (d.end_lineno - d.lineno)))
            keep.difference_update(range(d.lineno + 1, d.end_lineno + 1))
    for a, b, rep in sorted(edits, reverse=True):
        text = text[:a] + rep + text[b:]
    out = []
    for row, line in enumerate(re.split(r"(?<=\n)", text), 1):
        if row in keep:
            out.append(line)
        elif line.strip():
            out.append(line.rstrip() + "\n")
    result = "".join(out).encode()
    try:
        same = ast.dump(ast.parse(result)) == stripped_tree(src)
    except SyntaxError:
        same = False
    if not same:
        raise UserError("minifying changed the program (its syntax tree differs from the source's without docstrings); "
                        "pack it without --minify")
    return result


def pack(src: bytes, name: str = "train_gpt.py", minified: bool = False) -> bytes:
    """The smallest self-extracting stub for `src` (deterministic); with `minified`, for minify(src). The stub's decoded
    source is checked: byte for byte (exact), or the same syntax tree as `src` without docstrings (minified)."""
    try:
        compile(src, name, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        raise UserError(f"{name} does not compile ({e.__class__.__name__}: {e}); nothing packed") from None
    body = minify(src) if minified else src
    best = min(((c, base64.b85encode(f(body))) for c, f in _CODECS.items()), key=lambda x: len(x[1]))
    how = f", minified from {len(src)}" if minified else ""
    out = _STUB.format(name=os.path.basename(name), codec=best[0], n=len(body), how=how, sha=hashlib.sha256(body).hexdigest()[:16],
                       data=best[1].decode()).encode()
    inner = unpack(out)
    assert (same_program(src, inner) if minified else inner == src), "packed source does not decode to the script"
    return out


def same_program(src: bytes, other: bytes) -> bool:
    """Is `other` `src`, byte for byte or as minify() writes it (the same syntax tree once docstrings are dropped)?"""
    if other == src:
        return True
    try:
        return ast.dump(ast.parse(other)) == stripped_tree(src)
    except (SyntaxError, ValueError):
        return False


def sizes(src: bytes, name: str = "train_gpt.py") -> dict:
    """Bytes of the script as it is, packed exactly, and minified + packed."""
    return dict(readable=len(src), packed=len(pack(src, name)), minified=len(pack(src, name, minified=True)))


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
    ap.add_argument("-o", "--out", help="where to write the packed file (or the recovered source); not with --sizes")
    ap.add_argument("--minify", action="store_true", help="pack the source without docstrings, comments and blank lines")
    ap.add_argument("--unpack", action="store_true", help="recover the source from a packed file")
    ap.add_argument("--sizes", action="store_true", help="only print the readable, packed and minified+packed sizes")
    a = ap.parse_args(argv)
    if not a.sizes and not a.out:
        ap.error("give -o FILE (or --sizes to print the sizes only)")
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
    if not src.strip():
        raise UserError(f"{a.script} is empty; nothing to pack")
    exact = pack(src, a.script)
    small = pack(src, a.script, minified=True)
    print(f"{a.script}: {len(src)} bytes readable; packed {len(exact)} bytes (exact source); minified+packed {len(small)} bytes "
          f"({100 * (1 - len(small) / len(src)):.1f}% smaller; same syntax tree without docstrings)")
    if a.out:
        out = small if a.minify else exact
        write_atomic(a.out, out)
        print(f"wrote {a.out}: {len(out)} bytes ({'minified+packed' if a.minify else 'packed'}, "
              f"{100 * (1 - len(out) / len(src)):.1f}% smaller)")
    return 0


if __name__ == "__main__":
    cli(main)
