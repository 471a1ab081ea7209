"""One-time check of tests/voice_encoder.py (numpy) against resemblyzer on torch.

Torch is never a project dependency, so the check runs in two interpreters::

    .venv/bin/python -m bench.encoder_check dump /tmp/enc.npz        # our embeddings
    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.13.0 librosa \\
        webrtcvad-wheels && /tmp/tvenv/bin/pip install --no-deps resemblyzer==0.1.4
    /tmp/tvenv/bin/python bench/encoder_check.py compare /tmp/enc.npz  # the reference

``dump`` embeds four clips (espeak at 24 and 22.05 kHz, piper at 22.05 kHz, a 0.9 s clip at
16 kHz) and saves clips and embeddings; ``compare`` (needs only numpy and resemblyzer with
torch) embeds the same clips with ``VoiceEncoder.embed_utterance(preprocess_wav(...))`` and
prints cosine(ours, reference) and the largest absolute difference per clip.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def dump(path: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np

    from tests.voice_encoder import VoiceEncoder
    from tts_stream.server.piper import synthesize_piper
    from tts_stream.server.synth import synthesize

    clips: dict[str, tuple[Any, int]] = {
        "espeak_24k": (synthesize("Hello, I am recording this sample so that the system can "
                                  "learn my voice.", sample_rate=24000, voice="en-us+m3"), 24000),
        "espeak_22k": (synthesize("The morning was bright and calm.", sample_rate=22050,
                                  voice="en-us+f2", pitch=70), 22050),
        "piper_22k": (synthesize_piper("By noon a cool wind came from the west."), 22050),
        "short_16k": (synthesize("Hi there.", sample_rate=16000), 16000),
    }  # fmt: skip
    enc = VoiceEncoder()
    out: dict[str, Any] = {}
    for name, (pcm, rate) in clips.items():
        out[name + "_wav"], out[name + "_sr"] = pcm, rate
        out[name + "_emb"] = enc.embed(pcm, rate)
    np.savez(path, **out)
    print(f"wrote {path}")


def compare(path: str) -> None:
    import numpy as np
    from resemblyzer import VoiceEncoder, preprocess_wav  # type: ignore[import-untyped]

    data = np.load(path)
    enc = VoiceEncoder(device="cpu", verbose=False)
    names = sorted({k.rsplit("_", 1)[0] for k in data.files})
    for name in names:
        wav = data[name + "_wav"].astype(np.float32) / 32768.0
        ref = enc.embed_utterance(preprocess_wav(wav, source_sr=int(data[name + "_sr"])))
        ours = data[name + "_emb"]
        print(f"{name}: cos(ours, reference) = {float(np.dot(ours, ref)):.6f}, "
              f"max |diff| = {float(np.abs(ours - ref).max()):.1e}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("dump", "compare"):
        raise SystemExit(__doc__)
    (dump if sys.argv[1] == "dump" else compare)(sys.argv[2])
