"""Speaker similarity without torch: resemblyzer's bundled encoder run by a numpy forward pass.

Role: a speaker-similarity measure for tests and ``bench/likeness.py``. The weights are the
``pretrained.pt`` (17 MB, Apache-2.0) that ships inside the ``resemblyzer`` wheel; that wheel
is installed with ``--no-deps`` (Makefile) because it declares torch, which we never install
in the project. This module reimplements, in numpy, exactly what
``resemblyzer.VoiceEncoder.embed_utterance(preprocess_wav(x, sr))`` computes:

* preprocessing: resample to 16 kHz (soxr, as librosa's default ``soxr_hq``), raise the level
  to -30 dBFS (never lower it), drop long silences with webrtcvad (mode 3, 30 ms windows,
  moving average of 8, dilation of 7 windows);
* a 40-band mel power spectrogram (librosa's Slaney filterbank, 25 ms Hann window, 10 ms hop,
  centred with zero padding);
* partial utterances of 160 frames at 1.3 per second, each through a 3-layer LSTM (256) and
  a linear + ReLU layer, L2-normalised; the utterance embedding is their normalised mean.

``pretrained.pt`` is a legacy (pre-zip) torch pickle: :func:`load_weights` reads it with the
stdlib ``pickle`` and maps its storages to numpy arrays. The result was checked once against
the reference implementation (torch 2.13.0 CPU in a scratch venv, never a project
dependency): see ``bench/README.md`` (likeness).
"""

from __future__ import annotations

import functools
import importlib.util
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import soxr
import webrtcvad

__all__ = ["VoiceEncoder", "cosine", "load_weights", "weights_path"]

F32 = npt.NDArray[np.float32]
_RATE = 16000
_N_FFT = 400
_HOP = 160
_N_MELS = 40
_PARTIAL_FRAMES = 160
_VAD_WINDOW = 480  # 30 ms at 16 kHz
_VAD_AVERAGE = 8
_VAD_MAX_SILENCE = 6
_TARGET_DBFS = -30.0
_INT16_MAX = 2**15 - 1


def weights_path() -> Path:
    """Where the resemblyzer wheel put ``pretrained.pt`` (without importing it: it needs torch)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the speaker encoder needs the resemblyzer wheel's weights: "
            "pip install --no-deps resemblyzer==0.1.4 (make setup does it)"
        )
    return Path(spec.origin).parent / "pretrained.pt"


class _Storage:
    def __init__(self, dtype: str, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel
        self.data: npt.NDArray[Any] | None = None


_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "LongStorage": "<i8",
                   "IntStorage": "<i4", "HalfStorage": "<f2"}  # fmt: skip


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_: Any) -> tuple[Any, ...]:  # fmt: skip
    return ("tensor", storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: BinaryIO) -> None:
        super().__init__(f)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in the weights")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(_STORAGE_DTYPES[storage_type], key, int(numel))
        return self.storages[key]


def _materialise(obj: Any) -> Any:
    if isinstance(obj, tuple) and obj and obj[0] == "tensor":
        _, storage, offset, size, stride = obj
        assert storage.data is not None
        itemsize = storage.data.itemsize
        return np.lib.stride_tricks.as_strided(
            storage.data[offset:], shape=size, strides=[s * itemsize for s in stride]
        ).copy()
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    return obj


@functools.cache
def load_weights(path: str | None = None) -> dict[str, npt.NDArray[Any]]:
    """The encoder's ``model_state`` as numpy arrays, from the legacy torch file format."""
    with open(path or weights_path(), "rb") as f:
        magic = pickle.load(f)
        if magic != 0x1950A86A20F9469CFC6C:
            raise ValueError("not a legacy torch file")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info
        unpickler = _Unpickler(f)
        result = unpickler.load()
        keys = pickle.load(f)
        for key in keys:
            storage = unpickler.storages[key]
            numel = int.from_bytes(f.read(8), "little")
            dtype = np.dtype(storage.dtype)
            storage.data = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
    state = _materialise(result["model_state"])
    return {k: np.asarray(v) for k, v in state.items()}


@functools.cache
def _mel_basis() -> F32:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=40) (Slaney scale and norm)."""

    def hz_to_mel(f: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        f_sp, min_log_hz = 200.0 / 3, 1000.0
        mels = f / f_sp
        min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
        log = f >= min_log_hz
        mels[log] = min_log_mel + np.log(f[log] / min_log_hz) / logstep
        return mels

    def mel_to_hz(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        f_sp, min_log_hz = 200.0 / 3, 1000.0
        freqs = f_sp * m
        min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
        log = m >= min_log_mel
        freqs[log] = min_log_hz * np.exp(logstep * (m[log] - min_log_mel))
        return freqs

    fftfreqs = np.fft.rfftfreq(_N_FFT, 1.0 / _RATE)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(np.array([0.0]))[0],
                                  hz_to_mel(np.array([_RATE / 2.0]))[0], _N_MELS + 2))  # fmt: skip
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : _N_MELS + 2] - mel_f[:_N_MELS]))[:, None]
    return weights.astype(np.float32)


def _preprocess(wav: npt.NDArray[Any], sample_rate: int) -> F32:
    x = np.asarray(wav, dtype=np.float32)
    if np.asarray(wav).dtype.kind == "i":
        x = x / 32768.0
    if sample_rate != _RATE:
        x = soxr.resample(x, sample_rate, _RATE).astype(np.float32)
    rms = np.sqrt(np.mean((x * _INT16_MAX) ** 2))
    change = _TARGET_DBFS - 20 * np.log10(rms / _INT16_MAX)
    if change > 0:
        x = x * 10 ** (change / 20)
    # Trim long silences (resemblyzer.audio.trim_long_silences).
    x = x[: len(x) - len(x) % _VAD_WINDOW]
    pcm = np.round(x * _INT16_MAX).astype(np.int16).tobytes()
    vad = webrtcvad.Vad(3)
    flags = np.array([
        vad.is_speech(pcm[i * 2 : (i + _VAD_WINDOW) * 2], _RATE)
        for i in range(0, len(x), _VAD_WINDOW)
    ], dtype=np.float64)  # fmt: skip
    padded = np.concatenate([np.zeros((_VAD_AVERAGE - 1) // 2), flags, np.zeros(_VAD_AVERAGE // 2)])
    cum = np.cumsum(padded)
    cum[_VAD_AVERAGE:] = cum[_VAD_AVERAGE:] - cum[:-_VAD_AVERAGE]
    mask = np.round(cum[_VAD_AVERAGE - 1 :] / _VAD_AVERAGE).astype(bool)
    # binary_dilation with a structure of _VAD_MAX_SILENCE + 1 ones (centred).
    width = _VAD_MAX_SILENCE + 1
    half = width // 2
    padded_mask = np.concatenate([np.zeros(half, bool), mask, np.zeros(width - 1 - half, bool)])
    windows = np.lib.stride_tricks.sliding_window_view(padded_mask, width)
    dilated = windows.any(axis=1)
    return x[np.repeat(dilated, _VAD_WINDOW)]


def _mel(x: F32) -> F32:
    padded = np.pad(x, (_N_FFT // 2, _N_FFT // 2))
    n = 1 + (len(padded) - _N_FFT) // _HOP
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n, _N_FFT), strides=(padded.strides[0] * _HOP, padded.strides[0])
    )
    window = np.hanning(_N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    return (power @ _mel_basis().T).astype(np.float32)


def _sigmoid(x: F32) -> F32:
    out: F32 = 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow
    return out


class VoiceEncoder:
    """``embed(wav, sample_rate)`` → 256-d L2-normalised speaker embedding (numpy only)."""

    def __init__(self, path: str | None = None) -> None:
        w = load_weights(path)
        f32 = np.float32
        self._layers = [
            (w[f"lstm.weight_ih_l{i}"].astype(f32), w[f"lstm.weight_hh_l{i}"].astype(f32),
             (w[f"lstm.bias_ih_l{i}"] + w[f"lstm.bias_hh_l{i}"]).astype(f32))
            for i in range(3)
        ]  # fmt: skip
        self._linear = (w["linear.weight"].astype(np.float32), w["linear.bias"].astype(np.float32))

    def _forward(self, mels: F32) -> F32:
        """(batch, frames, 40) → (batch, 256) embeddings, as ``VoiceEncoder.forward``."""
        x = mels
        batch, steps, _ = x.shape
        for w_ih, w_hh, b in self._layers:
            hidden = w_hh.shape[1]
            h = np.zeros((batch, hidden), np.float32)
            c = np.zeros((batch, hidden), np.float32)
            gates_in = x @ w_ih.T + b  # all time steps at once
            out = np.empty((batch, steps, hidden), np.float32)
            for t in range(steps):
                g = gates_in[:, t] + h @ w_hh.T
                i, f, gg, o = np.split(g, 4, axis=1)  # torch's gate order
                c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(gg)
                h = _sigmoid(o) * np.tanh(c)
                out[:, t] = h
            x = out
        w, b = self._linear
        raw = np.maximum(0, h @ w.T + b)
        normed: F32 = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        return normed

    def embed(self, wav: npt.NDArray[Any], sample_rate: int, *, rate: float = 1.3,
              min_coverage: float = 0.75) -> F32:  # fmt: skip
        x = _preprocess(wav, sample_rate)
        n_frames = int(np.ceil((len(x) + 1) / _HOP))
        frame_step = int(np.round((_RATE / rate) / _HOP))
        steps = max(1, n_frames - _PARTIAL_FRAMES + frame_step + 1)
        starts = list(range(0, steps, frame_step))
        last = starts[-1] * _HOP
        coverage = (len(x) - last) / (_PARTIAL_FRAMES * _HOP)
        if coverage < min_coverage and len(starts) > 1:
            starts = starts[:-1]
        need = (starts[-1] + _PARTIAL_FRAMES) * _HOP
        if need >= len(x):
            x = np.pad(x, (0, need - len(x)))
        mel = _mel(x)
        mels = np.stack([mel[s : s + _PARTIAL_FRAMES] for s in starts])
        partial = self._forward(mels)
        raw = partial.mean(axis=0)
        out: F32 = (raw / np.linalg.norm(raw)).astype(np.float32)
        return out


def cosine(a: F32, b: F32) -> float:
    """Cosine similarity of two L2-normalised embeddings."""
    return float(np.dot(a, b))
