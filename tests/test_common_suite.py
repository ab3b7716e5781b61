"""transformers' own common model tests (ModelTesterMixin, GenerationTesterMixin, ConfigTester) run against this
package from `../shared/common_tests` (see its README), with the interpreter running this test."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import transformers_af2

COMMON_TESTS = Path(__file__).resolve().parents[2] / "shared" / "common_tests"
# Packages the transformers test files import besides this project's test extras.
HARNESS_PACKAGES = ("parameterized", "httpx", "pytest_timeout")
# The harness takes `audio_config.projection_dim` as the width of `get_audio_features`' output when the audio config
# has that field. AF2's audio config is CLAP's, whose `projection_dim` (512) belongs to CLAP's contrastive projection,
# which AF2 does not have: its audio features are the audio transformer's output (`config.audio_hidden_size`).
HARNESS_ASSUMPTIONS = ("test_get_audio_features_output_0", "test_get_audio_features_output_2")


@pytest.mark.skipif(not COMMON_TESTS.is_dir(), reason=f"the shared common tests are not at {COMMON_TESTS}")
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in HARNESS_PACKAGES),
    reason=f"the transformers test files need {', '.join(HARNESS_PACKAGES)} (pip install parameterized httpx "
    "pytest-timeout)",
)
def test_transformers_common_model_tests_pass():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("RUN_SLOW", None)  # the slow ones (torch.export) take minutes; tests/test_modeling_conventions.py exports
    package_root = str(Path(transformers_af2.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    deselect = " and ".join(f"not {name}" for name in HARNESS_ASSUMPTIONS)
    result = subprocess.run(
        ["bash", str(COMMON_TESTS / "run.sh"), "-k", deselect],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    counts = dict(re.findall(r"'(\w+)': (\d+)", output))
    assert "failed" not in counts and "error" not in counts, output[-5000:]
    assert int(counts.get("passed", 0)) > 100, output[-5000:]
    assert result.returncode == 0, output[-5000:]
