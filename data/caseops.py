"""CaseOps: a lossless lower-casing of text with private-use case markers, and the original bytes of each token.

The vocabulary of a tokenizer trained on the transformed text is spent on words rather than on their capitalizations
("The", "THE", "the" share pieces); validation BPB is still charged on the ORIGINAL text's UTF-8 bytes, through a
per-token byte count (the byte sidecar, see data/README.md). Three reserved private-use code points:

  CAP  U+E010  the next letter is uppercase                 "Hello"  -> CAP "hello"
  RUN  U+E011  the following run of letters is uppercase    "NASA"   -> RUN "nasa"
  ESC  U+E012  the next character is literal                U+E010   -> ESC U+E010 (only these three are escaped)

Only letters whose case mapping round-trips as single code points are lowered (U.lower() == l, l.upper() == U, both
one code point): 'ß', 'İ', 'ı', 'ǅ', 'ſ', 'µ', the Kelvin sign and the like stay as they are, and Greek capital sigma
always becomes 'σ' (never the final form 'ς'), so the mapping never depends on context. A run of letters is a maximal
run of such lowerable capitals and their lowercase partners. An uppercase stretch of >= 2 letters that ends its run
("NASA", "NASA's", "ΟΔΟΣ") gets one RUN; any other capital gets its own CAP ("Hello", "iPhone", "HTTPServer" -> 5 CAPs).
A marker goes before the ASCII whitespace in front of its letters ("a Hello" -> "a" CAP " hello"), so the tokenizer
sees the same "▁hello" as in lowercase text. decode() reads: ESC + any character; CAP + ASCII whitespace* + one
lowerable lowercase letter; RUN + ASCII whitespace* + the run of such letters; a marker that applies to nothing is
dropped. decode(encode(t)) == t for every str. The letter tables come from Python's Unicode database
(unicodedata.unidata_version): a tokenizer and its data must be built with the same one.

token_bytes() gives, for the tokens of a transformed document (their character offsets, as SentencePiece reports them),
the original UTF-8 bytes each token accounts for: 0 for markers, and the document's tokens sum to
len(original.encode()). Standard library and numpy only.
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np

CAP, RUN, ESC = "\ue010", "\ue011", "\ue012"
MARKERS = (CAP, RUN, ESC)  # the tokenizer's user-defined symbols: each marker is always one token
UNICODE_VERSION = unicodedata.unidata_version


def _case_tables() -> tuple[dict[str, str], dict[str, str]]:
    """(capital -> lowercase, lowercase -> capital) over the letters whose case round-trips as single code points.
    Every cased character lies in planes 0 and 1."""
    lower = {}
    for cp in range(0x20000):
        c = chr(cp)
        low = c.lower()
        if low != c and len(low) == 1 and low.upper() == c:
            lower[c] = low
    upper = {v: k for k, v in lower.items()}
    assert len(upper) == len(lower) and not set(lower) & set(upper)
    return lower, upper


def _char_class(chars) -> str:
    """A regex character class body for a set of characters, as ranges of \\U escapes."""
    cps, parts, i = sorted(map(ord, chars)), [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\U{cps[i]:08x}" + (f"-\\U{cps[j]:08x}" if j > i else ""))
        i = j + 1
    return "".join(parts)


LOWER, UPPER = _case_tables()
_TO_LOWER, _TO_UPPER = str.maketrans(LOWER), str.maketrans(UPPER)
_U, _L, _WS = _char_class(LOWER), _char_class(UPPER), r" \t\n\r\x0b\x0c"
# encode: the whitespace before a maximal stretch of capitals (the lookbehind keeps whitespace runs linear), the
# capitals, and the letter after them if it is lowercase (the run goes on)
_ENC = re.compile(f"(?<![{_WS}])([{_WS}]*)([{_U}]+)([{_L}])?")
_ESCAPE = re.compile(f"[{CAP}{RUN}{ESC}]")
# decode: the exact inverse, alternatives tried in this order at each marker
_DEC = re.compile(f"{ESC}(.)|{CAP}([{_WS}]*[{_L}])|{RUN}([{_WS}]*[{_L}]+)|[{CAP}{RUN}{ESC}]", re.DOTALL)
# characters whose UTF-8 length differs from that of their capital (e.g. 'ⱥ' 3 bytes, 'Ⱥ' 2)
_ODD = {c: len(UPPER[c].encode()) for c in UPPER if len(c.encode()) != len(UPPER[c].encode())}


def _encode_stretch(m: re.Match) -> str:
    ws, caps, after = m.group(1), m.group(2).translate(_TO_LOWER), m.group(3)
    if len(caps) >= 2 and after is None:  # the capitals end the run: one RUN for all of them
        return RUN + ws + caps
    return CAP + ws + CAP.join(caps) + (after or "")


def encode(text: str) -> str:
    """The transformed text: capitals lowered behind CAP/RUN markers, literal marker characters escaped."""
    if _ESCAPE.search(text):
        text = _ESCAPE.sub(lambda m: ESC + m.group(), text)
    return _ENC.sub(_encode_stretch, text)


def _decode_marker(m: re.Match) -> str:
    if m.group(1) is not None:
        return m.group(1)
    if m.group(2) is not None:
        return m.group(2).translate(_TO_UPPER)
    if m.group(3) is not None:
        return m.group(3).translate(_TO_UPPER)
    return ""  # a marker that applies to nothing


def decode(text: str) -> str:
    """The original text of encode()'s output (any str is accepted; markers that apply to nothing are dropped)."""
    return _DEC.sub(_decode_marker, text)


def char_bytes(encoded: str) -> np.ndarray:
    """For each character of a transformed text, the UTF-8 bytes of the original character it stands for (int64): 0 for
    a marker, the capital's length for a lowered letter, the character's own length otherwise. Sums to
    len(decode(encoded).encode())."""
    cps = np.frombuffer(encoded.encode("utf-32-le"), dtype="<u4")
    w = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    for m in _DEC.finditer(encoded):
        w[m.start()] = 0
        if _ODD and (m.group(2) or m.group(3)):
            for i in range(m.start(2) if m.group(2) else m.start(3), m.end()):
                if encoded[i] in _ODD:
                    w[i] = _ODD[encoded[i]]
    return w


def token_bytes(encoded: str, offsets) -> np.ndarray:
    """The original UTF-8 bytes each token of a transformed document accounts for (int64, one per token).

    `offsets`: each token's (begin, end) character offsets in `encoded`, in token order (SentencePiece's
    encode(..., out_type="offset_mapping")). Token i accounts for the characters from its begin up to the next
    token's begin; the first token also for any characters before it, the last for any after it (what the
    tokenizer's normalization dropped: extra whitespace, control characters). A marker token accounts for 0 bytes:
    what it would take (dropped whitespace before it) goes to the token after it. So the tokens sum to
    len(decode(encoded).encode()) whenever there is at least one."""
    n = len(offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    w = char_bytes(encoded)
    begins = np.maximum.accumulate(np.fromiter((b for b, _ in offsets), dtype=np.int64, count=n).clip(0, len(encoded)))
    cuts = np.concatenate(([0], begins[1:], [len(encoded)]))
    csum = np.concatenate(([0], np.cumsum(w)))
    out = csum[cuts[1:]] - csum[cuts[:-1]]
    if len(encoded):  # a token that starts at a marker (weight 0; an escaped character weighs its bytes) passes on
        at_marker = (begins < len(encoded)) & (w[begins.clip(max=len(encoded) - 1)] == 0)  # what it took
        for i in np.flatnonzero(at_marker).tolist():
            j = i + 1 if i + 1 < n else i - 1
            if out[i] and j >= 0:
                out[j] += out[i]
                out[i] = 0
    return out
