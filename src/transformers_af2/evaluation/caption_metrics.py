"""
Captioning metrics through aac-metrics, the DCASE reference implementation: CIDEr-D always, SPICE and SPIDEr when
Java and the SPICE models are installed. Nothing here downloads anything.

The official pipeline tokenises every sentence with Stanford's PTB tokenizer (a Java program,
stanford-corenlp-3.4.1.jar) before scoring. It runs when Java is on PATH and that jar is in aac-metrics' cache
(`aac-metrics-download`) or in the installed pycocoevalcap package, which ships it; its output is filtered with
pycocoevalcap's punctuation list exactly (which keeps `-lrb-`, `-rrb-` and the like). Without Java or the jar, a
Python tokenizer with the same rules for plain English captions stands in, and the results label the scores
approximate (`tokenizer: "approximate: ..."`, `approximate: true`). SPICE also needs the Stanford CoreNLP 3.6.0 models, which only `aac-metrics-download`
fetches (from the web): absent, SPICE and SPIDEr are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from ..utils import install_hint

_CORENLP_JAR = Path("aac-metrics") / "stanford_nlp" / "stanford-corenlp-3.4.1.jar"
_SPICE_JAR = Path("aac-metrics") / "spice" / "spice-1.0.jar"
# pycocoevalcap's (and aac-metrics') list, as it is: the bracket tokens are written in upper case there while
# `-lowerCase` makes them lower case, so "-lrb-" and the like are kept in the scored text. The official numbers
# depend on that, so it is kept.
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def _import_aac_metrics():
    try:
        import aac_metrics.functional  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"captioning metrics need aac-metrics ({error}); install them with: {install_hint('eval')}"
        ) from None
    return aac_metrics


def _aac_cache_dir() -> Path:
    from aac_metrics.utils.globals import get_default_cache_path

    return Path(os.path.expanduser(get_default_cache_path()))


def _java() -> str | None:
    return shutil.which("java")


def _bundled_corenlp_jar() -> Path | None:
    """pycocoevalcap ships stanford-corenlp-3.4.1.jar in its tokenizer folder."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    return jar if jar.is_file() else None


_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_OPENERS = "\"'`([{"
_CLOSERS = "\"'`)]},;:!?"
_ABBREVIATION = re.compile(r"^(?:[a-z]\.)+$")  # p.m., u.s.: PTB keeps their final period


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def python_ptb_tokenize(sentence: str) -> list[str]:
    """
    An approximation of PTBTokenizer's `-lowerCase` output for plain English captions, after pycocoevalcap's
    punctuation filter: quotes and sentence punctuation split off words and dropped, brackets split off and kept as
    `-lrb-` / `-rrb-` / `-lsb-` / `-rsb-` / `-lcb-` / `-rcb-` (as the official pipeline keeps them), clitics ('s,
    n't, 're, ...) split, hyphenated words, times (3:00) and abbreviations (p.m.) kept whole. Used only without Java,
    and labelled approximate in the results: PTB's rules for rarer text (numbers with commas, URLs, emoticons, "cannot")
    are not all reproduced.
    """
    tokens: list[str] = []
    for word in sentence.lower().split():
        leading: list[str] = []
        while word and word[0] in _OPENERS:
            leading.append(word[0])
            word = word[1:]
        trailing: list[str] = []
        while word:
            if word.endswith("..."):
                word, piece = word[:-3], "..."
            elif word[-1] in _CLOSERS:
                word, piece = word[:-1], word[-1]
            elif word.endswith(".") and not _ABBREVIATION.match(word):
                word, piece = word[:-1], "."
            else:
                break
            trailing.append(piece)
        tokens += [_BRACKETS[p] for p in leading if p in _BRACKETS]
        clitic = next((c for c in _CLITICS if word.endswith(c) and len(word) > len(c)), None)
        if clitic is not None:
            tokens += [word[: -len(clitic)], clitic]
        elif word and word.strip(_OPENERS + _CLOSERS + ".-"):
            tokens.append(word)
        tokens += [_BRACKETS[p] for p in reversed(trailing) if p in _BRACKETS]
    return [t for t in tokens if t not in _PTB_PUNCTUATION]


def _corenlp_jar() -> Path | None:
    cached = _aac_cache_dir() / _CORENLP_JAR
    return cached if cached.is_file() else _bundled_corenlp_jar()


def java_ptb_tokenize(sentences: list[str], java: str, jar: Path) -> list[list[str]]:
    """
    Stanford's PTBTokenizer as the DCASE / pycocoevalcap pipeline runs it (`-preserveLines -lowerCase`, one sentence
    per line), punctuation tokens dropped. Called directly: aac-metrics refuses Java newer than 13, which the
    tokenizer itself runs on fine.
    """
    text = "\n".join(s.replace("\n", " ").replace("\r", " ") for s in sentences)
    result = subprocess.run(
        [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"],
        input=text.encode(),
        capture_output=True,
        timeout=600,
    )
    lines = result.stdout.decode().split("\n")
    if lines and lines[-1] == "" and len(lines) == len(sentences) + 1:
        lines = lines[:-1]
    if result.returncode != 0 or len(lines) != len(sentences):
        raise RuntimeError(
            f"PTBTokenizer ({jar}) failed: exit status {result.returncode}, {len(lines)} lines for {len(sentences)} "
            f"sentences; stderr: {result.stderr.decode()[-500:]}"
        )
    # pycocoevalcap: ' '.join(w for w in line.rstrip().split(' ') if w not in PUNCTUATIONS)
    return [[t for t in line.rstrip().split(" ") if t and t not in _PTB_PUNCTUATION] for line in lines]


def _tokenize(candidates, references, java: str | None) -> tuple[list[str], list[list[str]], str]:
    """Tokenised and re-joined sentences, and which tokenizer produced them."""
    jar = _corenlp_jar()
    sizes = [len(group) for group in references]
    flat = list(candidates) + [r for group in references for r in group]
    if java is not None and jar is not None:
        tokens, tokenizer = java_ptb_tokenize(flat, java, jar), "ptb (java)"
    else:
        reason = (
            "no java on PATH" if java is None else "no stanford-corenlp-3.4.1.jar (aac-metrics cache, pycocoevalcap)"
        )
        tokens = [python_ptb_tokenize(s) for s in flat]
        tokenizer = f"approximate: python stand-in for PTBTokenizer ({reason}); not the official numbers"
    joined = [" ".join(t) for t in tokens]
    tokenized, rest = joined[: len(candidates)], joined[len(candidates) :]
    grouped, start = [], 0
    for size in sizes:
        grouped.append(rest[start : start + size])
        start += size
    return tokenized, grouped, tokenizer


def spice_unavailable_reason(java: str | None) -> str | None:
    """Why SPICE cannot run here, or None when it can."""
    if java is None:
        return "SPICE needs Java (e.g. apt-get install default-jre-headless)"
    cache = _aac_cache_dir()
    if not (cache / _SPICE_JAR).is_file() or not (cache / _SPICE_JAR).parent.joinpath("lib").is_dir():
        return (
            f"SPICE needs the Stanford CoreNLP models in {cache / _SPICE_JAR.parent}, which only "
            "`aac-metrics-download` fetches (from the web)"
        )
    return None


def caption_scores(candidates: list[str], references: list[list[str]]) -> tuple[dict, dict[str, str]]:
    """
    `({"cider_d": ..., "spice": ..., "spider": ..., "tokenizer": ...}, {skipped metric: reason})` for candidates and
    their reference lists. Scores are on aac-metrics' scale (CIDEr-D around 0-1.5), as captioning papers print them.
    """
    _import_aac_metrics()
    from aac_metrics.functional.cider_d import cider_d

    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates for {len(references)} reference lists.")
    if not candidates:
        raise ValueError("no predictions to score.")
    if any(not group for group in references):
        raise ValueError("every candidate needs at least one reference caption.")
    if len(candidates) < 2:
        raise ValueError("CIDEr-D's document frequencies need at least 2 clips; got 1.")
    java = _java()
    tokenized, tokenized_refs, tokenizer = _tokenize(candidates, references, java)
    corpus, _ = cider_d(tokenized, tokenized_refs)
    metrics: dict = {"cider_d": float(corpus["cider_d"]), "tokenizer": tokenizer}
    if tokenizer.startswith("approximate"):
        metrics["approximate"] = True
    skipped: dict[str, str] = {}
    reason = spice_unavailable_reason(java)
    if reason is None:
        from aac_metrics.functional.spice import spice

        try:
            spice_corpus, _ = spice(tokenized, tokenized_refs, java_path=java)
        except (RuntimeError, OSError, ValueError) as error:  # e.g. a Java version aac-metrics does not accept
            reason = f"SPICE failed: {error}"
        else:
            metrics["spice"] = float(spice_corpus["spice"])
            metrics["spider"] = (metrics["cider_d"] + metrics["spice"]) / 2
    if reason is not None:
        skipped["spice"] = skipped["spider"] = reason
    return metrics, skipped
