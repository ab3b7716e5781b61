"""Captioning metrics (aac-metrics' CIDEr-D) against values worked out by hand; the PTB tokenizer; SPICE's skip."""

import shutil
import socket

import pytest

pytest.importorskip("aac_metrics", reason="captioning metrics need the [eval] extra (aac-metrics)")

from transformers_af2.evaluation import caption_metrics  # noqa: E402
from transformers_af2.evaluation.caption_metrics import caption_scores, java_ptb_tokenize, python_ptb_tokenize  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Scoring must never reach the network (aac-metrics can download models; nothing here may)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(params=["java", "python"])
def tokenizer(request, monkeypatch, tmp_path):
    """Both tokenizer paths: Java's PTBTokenizer (when installed) and the stand-in (no java on PATH)."""
    if request.param == "java":
        if shutil.which("java") is None or caption_metrics._corenlp_jar() is None:
            pytest.skip("needs java and stanford-corenlp-3.4.1.jar (pycocoevalcap or the aac-metrics cache)")
    else:
        monkeypatch.setenv("PATH", str(tmp_path))
    return request.param


def test_cider_d_by_hand(tokenizer):
    # Two clips whose words appear nowhere else: every n-gram has idf log(2). A candidate equal to its references
    # scores cosine 1 for each n it has: "a dog barks" has no 4-gram -> 10 * (1+1+1+0)/4 = 7.5; the five-word caption
    # has all four -> 10. Casing and punctuation vanish in tokenisation.
    metrics, _ = caption_scores(
        ["A dog barks.", "rain falls on a roof"], [["a dog barks", "A dog barks!"], ["Rain falls on a roof."]]
    )
    assert metrics["cider_d"] == pytest.approx((7.5 + 10) / 2)
    assert metrics["tokenizer"].startswith("ptb (java)" if tokenizer == "java" else "approximate: python stand-in")
    assert metrics.get("approximate", False) == (tokenizer == "python")
    # A candidate sharing no n-gram with its references scores 0.
    metrics, _ = caption_scores(["A dog barks.", "birds sing"], [["a dog barks"], ["rain falls on a roof"]])
    assert metrics["cider_d"] == pytest.approx(7.5 / 2)


def test_python_tokenizer_matches_ptb():
    java, jar = shutil.which("java"), caption_metrics._corenlp_jar()
    if java is None or jar is None:
        pytest.skip("needs java and stanford-corenlp-3.4.1.jar to compare against")
    sentences = [
        "A dog barks, then a car passes by.",
        "The man's voice isn't loud...",
        '"Birds" chirp (loudly); wind-blown leaves!',
        "Children's toys rattle -- a cat meows at 3:00 p.m.",
        "Someone says 'hello' twice - and leaves.",
    ]
    assert [python_ptb_tokenize(s) for s in sentences] == java_ptb_tokenize(sentences, java, jar)
    assert python_ptb_tokenize("The man's voice isn't loud...") == ["the", "man", "'s", "voice", "is", "n't", "loud"]


def test_spice_and_spider_skipped_with_reason(tmp_path, monkeypatch):
    import aac_metrics

    previous = aac_metrics.get_default_cache_path()
    aac_metrics.set_default_cache_path(str(tmp_path))  # an empty cache: no SPICE models
    try:
        metrics, skipped = caption_scores(["a b c", "d e f"], [["a b c"], ["d e f"]])
    finally:
        aac_metrics.set_default_cache_path(previous)
    assert "spice" not in metrics and "spider" not in metrics
    assert set(skipped) == {"spice", "spider"}
    reason = skipped["spice"]
    assert "aac-metrics-download" in reason or "Java" in reason


def test_bad_caption_inputs():
    with pytest.raises(ValueError, match="at least 2 clips"):
        caption_scores(["a dog"], [["a dog"]])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="2 candidates for 1 reference lists"):
        caption_scores(["a", "b"], [["a"]])
