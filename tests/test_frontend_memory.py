"""Peak memory of reading a file grows with the channel used and the seconds used, not with the channel count.

Each measurement runs in a fresh process: the peak resident set (`VmHWM`, reset through `/proc/self/clear_refs`)
while the front end encodes one file, minus the resident set before it. Linux only.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

CLEAR_REFS = Path("/proc/self/clear_refs")

pytestmark = pytest.mark.skipif(
    not CLEAR_REFS.exists() or not Path("/proc/self/status").exists(),
    reason="peak resident memory is measured through Linux's /proc/self/{status,clear_refs}",
)

MEASURE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from transformers_af2 import AudioFlamingo2FeatureExtractor

    def status_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    extractor = AudioFlamingo2FeatureExtractor()
    extractor(np.full(48000, 0.1), sampling_rate=48000)  # loads torch's and soxr's code before measuring
    for path in sys.argv[1:]:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident set
        before = status_kib("VmRSS")
        out = extractor([path])
        assert out["input_features_mask"].tolist() == [[1] * 12], out["input_features_mask"]
        print(status_kib("VmHWM") - before)
        del out
    """
)


def write_noise(path, rate, channels, seconds):
    """`seconds` of 16-bit noise, written one second at a time; channel 0 is the same whatever `channels`."""
    rng = np.random.default_rng(0)
    second = (0.3 * rng.standard_normal((rate, channels))).clip(-1, 1).astype(np.float32)
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, subtype="PCM_16") as handle:
        for _ in range(seconds):
            handle.write(second)


def peak_mib(*paths) -> list[float]:
    """Peak memory of encoding each file, in MiB, measured one after the other in one fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, paths)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [int(value) / 1024 for value in result.stdout.split()[-len(paths) :]]


def test_eight_channel_192k_file_peaks_like_a_mono_one(tmp_path):
    mono, eight = tmp_path / "mono.wav", tmp_path / "eight.wav"
    write_noise(mono, 192000, 1, 120)
    write_noise(eight, 192000, 8, 120)
    mono_mib, eight_mib = peak_mib(mono, eight)
    # One channel of 2 min at 192 kHz is 88 MiB as float32; reading all 8 as float64 was 1.4 GiB before copies.
    assert eight_mib < 2 * mono_mib, f"8 channels: {eight_mib:.0f} MiB, mono: {mono_mib:.0f} MiB"
    assert mono_mib < 600, f"mono 2 min at 192 kHz peaks at {mono_mib:.0f} MiB"
