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


def _official_ptb(sentences):
    """pycocoevalcap's own PTBTokenizer, run as the official pipeline runs it."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({index: [{"caption": s}] for index, s in enumerate(sentences)})
    return [tokenized[index][0] for index in range(len(sentences))]


SENTENCES = [
    "Birds (sparrows) chirp while a car passes.",
    "A dog [barking] near {water} flowing.",
    'Someone says "hello" -- then leaves...',
    "The man's voice isn't loud; rain falls at 3:00 p.m.",
    "Wind-blown leaves rustle, and a door creaks!",
    "People talk (indistinctly) in the background",
]


def test_java_tokenization_is_pycocoevalcaps():
    pytest.importorskip("pycocoevalcap", reason="the official tokenizer to compare with")
    java, jar = shutil.which("java"), caption_metrics._corenlp_jar()
    if java is None or jar is None:
        pytest.skip("needs java and stanford-corenlp-3.4.1.jar")
    ours = [" ".join(tokens) for tokens in java_ptb_tokenize(SENTENCES, java, jar)]
    assert ours == _official_ptb(SENTENCES)
    assert "-lrb- sparrows -rrb-" in ours[0]  # kept, as the official pipeline keeps them
    # The no-Java approximation agrees on these captions.
    assert [" ".join(python_ptb_tokenize(s)) for s in SENTENCES] == ours


def test_cider_d_equals_the_official_pipeline_with_brackets():
    """CIDEr-D on a set with "(birds)": the official tokenisation (pycocoevalcap) fed to aac-metrics' CIDEr-D."""
    pytest.importorskip("pycocoevalcap", reason="the official tokenizer to compare with")
    if shutil.which("java") is None or caption_metrics._corenlp_jar() is None:
        pytest.skip("needs java and stanford-corenlp-3.4.1.jar")
    from aac_metrics.functional.cider_d import cider_d

    candidates = ["Small (birds) chirp in trees.", "A car passes by", "Rain (heavy) falls on a roof"]
    references = [
        ["Birds chirp in the trees (small birds).", "small birds chirp"],
        ["A car drives past.", "a car passes by on a road"],
        ["Heavy rain falls on a roof.", "rain (heavy) hits the roof"],
    ]
    flat = candidates + [r for group in references for r in group]
    official = _official_ptb(flat)
    official_refs = [official[3:5], official[5:7], official[7:9]]
    expected = float(cider_d(official[:3], official_refs)[0]["cider_d"])
    metrics, _ = caption_scores(candidates, references)
    assert metrics["cider_d"] == pytest.approx(expected, rel=1e-9)
    # Dropping the bracket tokens (the former behaviour) gives another number.
    stripped = [" ".join(t for t in s.split() if t not in ("-lrb-", "-rrb-")) for s in official]
    other = float(cider_d(stripped[:3], [stripped[3:5], stripped[5:7], stripped[7:9]])[0]["cider_d"])
    assert other != pytest.approx(expected)
