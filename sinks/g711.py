"""G.711 μ-law (PCMU) and A-law (PCMA) in numpy (pure: no I/O).

Encoding follows the ITU-T reference implementation (G.191 STL ``g711.c``:
``ulaw_compress`` / ``alaw_compress``) for 16-bit input, bit for bit: negative samples are
folded with the ones' complement (``~x``), so ``x`` and ``-x - 1`` differ only in the sign
bit. (The classic Sun ``g711.c`` behind ``audioop.lin2ulaw`` negates instead, and so picks the
neighbouring μ-law code for some negative inputs on a decision boundary; A-law is identical in
both.) Decoding is the G.711 reconstruction value of each code, as in G.191 ``*_expand``,
audioop and ffmpeg. Both directions are table lookups built once at import (64 KiB per law
for encoding, 256 values for decoding; ``take`` rather than fancy indexing, about twice as
fast on a 100 ms frame).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tts_stream.audio import PCM16

__all__ = [
    "ALAW_DECODE",
    "ULAW_DECODE",
    "alaw_decode",
    "alaw_encode",
    "ulaw_decode",
    "ulaw_encode",
]

U8 = npt.NDArray[np.uint8]


def _bit_length(x: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    out = np.zeros_like(x)
    v = x.copy()
    while np.any(v):
        nz = v != 0
        out[nz] += 1
        v >>= 1
    return out


def _build_ulaw_encode() -> U8:
    x = np.arange(-32768, 32768, dtype=np.int32)
    # G.191: 14-bit magnitude (ones' complement for negatives) plus the bias 33, clipped.
    absno = np.minimum(np.where(x < 0, (~x) >> 2, x >> 2) + 33, 0x1FFF)
    segno = 1 + _bit_length(absno >> 6)  # segment 1..8
    high = 8 - segno
    low = 0x0F - ((absno >> segno) & 0x0F)
    code = (high << 4) | low | np.where(x >= 0, 0x80, 0)
    return _by_uint16(code.astype(np.uint8))


def _build_alaw_encode() -> U8:
    x = np.arange(-32768, 32768, dtype=np.int32)
    ix = np.where(x < 0, (~x) >> 4, x >> 4)  # 11-bit magnitude, 0..2047
    iexp = np.maximum(_bit_length(ix) - 4, 0)  # exponent 0..7 (0 and 1 share a step size)
    seg = np.where(ix > 15, ((ix >> np.maximum(iexp - 1, 0)) - 16) + (iexp << 4), ix)
    code = (seg | np.where(x >= 0, 0x80, 0)) ^ 0x55  # sign bit, then toggle the even bits
    return _by_uint16(code.astype(np.uint8))


def _by_uint16(codes_from_minus_32768: U8) -> U8:
    # Reorder so that the table is indexed by the int16 sample's bit pattern as uint16.
    return np.roll(codes_from_minus_32768, -32768)


def _build_ulaw_decode() -> PCM16:
    c = (~np.arange(256, dtype=np.int32)) & 0xFF
    exponent = (c >> 4) & 0x07
    mantissa = c & 0x0F
    step = 4 << (exponent + 1)
    magnitude = (0x80 << exponent) + step * mantissa + step // 2 - 4 * 33
    return np.where(np.arange(256) < 0x80, -magnitude, magnitude).astype(np.int16)


def _build_alaw_decode() -> PCM16:
    codes = np.arange(256, dtype=np.int32)
    ix = (codes ^ 0x55) & 0x7F
    iexp = ix >> 4
    mant = np.where(iexp > 0, (ix & 0x0F) + 16, ix & 0x0F)
    mant = (mant << 4) + 8
    mant = np.where(iexp > 1, mant << np.maximum(iexp - 1, 0), mant)
    return np.where(codes > 127, mant, -mant).astype(np.int16)


_ULAW_ENCODE = _build_ulaw_encode()
_ALAW_ENCODE = _build_alaw_encode()
ULAW_DECODE: PCM16 = _build_ulaw_decode()
"""Linear value of each μ-law code (index = code byte)."""
ALAW_DECODE: PCM16 = _build_alaw_decode()
"""Linear value of each A-law code (index = code byte)."""
for _table in (_ULAW_ENCODE, _ALAW_ENCODE, ULAW_DECODE, ALAW_DECODE):
    _table.flags.writeable = False


def ulaw_encode(samples: PCM16) -> bytes:
    """Encode int16 samples as G.711 μ-law bytes (one byte per sample)."""
    return _ULAW_ENCODE.take(np.asarray(samples, dtype=np.int16).view(np.uint16)).tobytes()


def alaw_encode(samples: PCM16) -> bytes:
    """Encode int16 samples as G.711 A-law bytes (one byte per sample)."""
    return _ALAW_ENCODE.take(np.asarray(samples, dtype=np.int16).view(np.uint16)).tobytes()


def ulaw_decode(data: bytes | bytearray | memoryview) -> PCM16:
    """Decode G.711 μ-law bytes to int16 samples."""
    return ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def alaw_decode(data: bytes | bytearray | memoryview) -> PCM16:
    """Decode G.711 A-law bytes to int16 samples."""
    return ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]
