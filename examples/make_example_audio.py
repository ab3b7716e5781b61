"""Writes examples/doorbell.wav: a synthetic two-tone door chime ("ding-dong") over light room noise.

3 s, 16 kHz, mono, 16-bit PCM (about 94 KB). Deterministic: running it again writes the same file.

    python examples/make_example_audio.py
"""

from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLING_RATE = 16000
DURATION = 3.0


def chime(frequency: float, start: float, length: float, t: np.ndarray) -> np.ndarray:
    """A bell-like tone: a few inharmonic partials with an exponential decay, starting at `start` seconds."""
    local = t - start
    active = (local >= 0) & (local < length)
    envelope = np.where(active, np.exp(-3.0 * np.clip(local, 0, None)) * np.clip(local / 0.005, 0, 1), 0.0)
    partials = [(1.0, 1.0), (2.0, 0.5), (2.76, 0.25), (5.4, 0.1)]
    tone = sum(weight * np.sin(2 * np.pi * frequency * ratio * local) for ratio, weight in partials)
    return envelope * tone


def main() -> None:
    t = np.arange(int(DURATION * SAMPLING_RATE)) / SAMPLING_RATE
    signal = chime(659.25, 0.2, 1.3, t) + chime(523.25, 1.0, 2.0, t)  # E5 then C5: "ding-dong"
    noise = np.random.default_rng(0).normal(0.0, 0.01, t.shape)
    audio = 0.8 * signal / np.abs(signal).max() + noise
    out = Path(__file__).with_name("doorbell.wav")
    sf.write(out, audio.astype(np.float32), SAMPLING_RATE, subtype="PCM_16")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
