"""
`af2 demo`: a Gradio page to ask a model of the Flamingo family (Audio Flamingo 2, Audio Flamingo 3, Music
Flamingo; see `transformers_af2.families`) about a clip (needs the `[demo]` extra: `pip install
transformers-af2[demo]`).

The page uploads or records a clip, shows what the model hears of it (its windows: AF2 10 s, AF3 / Music Flamingo
30 s; the seconds past its limit) and streams the answer to questions about it. A clip is encoded once: its features,
and what the model can compute once per clip (AF2: the audio keys/values of every cross-attention layer), are kept
(`ClipCache`), so further questions about the same clip redo no audio front end. One model serves every visitor:
Gradio's queue runs one model call at a time.

`AudioQuestionAnswerer` is the part without a user interface (what the page and its API call), usable on its own.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from .families import EncodedAudio, family_for
from .generation_utils import through_first_eos
from .runstore import file_sha256
from .soundcot import SOUNDCOT_REPAIR_MAX_PROMPT_TOKENS, soundcot_repair_prefix
from .utils import DEFAULT_TOP_K, DEFAULT_TOP_P, install_hint, one_line

DEFAULT_MAX_NEW_TOKENS = 256
EXAMPLE_QUESTIONS = [
    "What is the sound in this audio?",
    "Describe the audio in detail.",
    "What genre is this music, and which instruments play?",
    "Is the speaker happy, angry or sad?",
    "How many times does the event occur?",
]


# ---------------------------------------------------------------------------------------------------------------------
# The model side: clips encoded once, answers streamed
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedClip:
    """
    One clip as the model reads it: `audio`, its family's front-end output (`families.EncodedAudio`), and
    `model_state`, what the model computes once per clip for all questions about it (AF2: each cross-attention
    layer's audio keys/values and token mask as `AudioFlamingo2Cache` holds them; None for AF3 / Music Flamingo).
    `spectrogram`: the log-mel windows (windows, frames, mels) for the picture.
    """

    key: str
    duration: float | None  # seconds in the file (None when only the model's front end can tell)
    num_windows: int
    window_seconds: float
    max_seconds: float
    audio: EncodedAudio = field(repr=False)
    spectrogram: np.ndarray = field(repr=False)
    model_state: object = field(repr=False, default=None)
    encode_seconds: float = 0.0
    model_name: str = "the model"  # the family's short name, for the page ("AF2", "AF3", "MF")

    @property
    def read_seconds(self) -> float:
        """Seconds of the file the model hears (the rest of the last window is zero padding)."""
        covered = self.num_windows * self.window_seconds
        return covered if self.duration is None else min(self.duration, covered)

    @property
    def dropped_seconds(self) -> float:
        """Seconds past the model's limit (its most windows): never heard."""
        return 0.0 if self.duration is None else max(0.0, self.duration - self.max_seconds)


class ClipCache:
    """The most recently used encoded clips, keyed by the content of their files; thread safe."""

    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"ClipCache capacity must be at least 1; got {capacity}.")
        self.capacity = capacity
        self._clips: OrderedDict[str, EncodedClip] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> EncodedClip | None:
        with self._lock:
            clip = self._clips.get(key)
            if clip is not None:
                self._clips.move_to_end(key)
            return clip

    def put(self, clip: EncodedClip) -> None:
        with self._lock:
            self._clips[clip.key] = clip
            self._clips.move_to_end(clip.key)
            while len(self._clips) > self.capacity:
                self._clips.popitem(last=False)

    def __len__(self) -> int:
        return len(self._clips)


class AudioQuestionAnswerer:
    """
    Answers questions about audio files with one model of any supported family and its processor, encoding each
    clip once.

    `answer_stream(path, question, ...)` yields the answer as it grows; its last value is the family's answer for
    the same audio, question and generation settings (for AF2 exactly what `pipeline("audio-text-to-text")`
    returns). Model calls are serialised by a lock, so one instance can serve several threads.
    """

    def __init__(self, model, processor, max_cached_clips: int = 8):
        self.model = model
        self.processor = processor
        self.family = family_for(model, processor)
        self.clips = ClipCache(max_cached_clips)
        self.encode_count = 0  # clips encoded so far: what the cache saves shows here
        self._model_lock = threading.Lock()

    def encode(self, path: str | os.PathLike) -> EncodedClip:
        """The clip at `path`, from the cache or encoded now (the family's front end, then what the model computes
        once per clip; see `ModelFamily.clip_state`)."""
        if path is None or not os.path.isfile(path):
            raise FileNotFoundError(f"audio {path}: no such file; upload or record a clip first.")
        key = file_sha256(path)  # the clip's bytes: the same file uploaded twice (new temporary path) is one clip
        clip = self.clips.get(key)
        if clip is not None:
            return clip
        start = time.perf_counter()
        name = os.path.basename(str(path))
        try:
            audio = self.family.encode_audio(str(path))
        except Exception as error:  # the front end names the problem; show the file by its name, not its upload path
            # One clip per call: the input label the front end prefixes ("audio: ") says nothing here.
            message = one_line(error).replace(str(path), name).removeprefix("audio[0]: ").removeprefix("audio: ")
            raise ValueError(message if name in message else f"{name}: {message}") from error
        with self._model_lock, torch.inference_mode():
            state = self.family.clip_state(self.model, audio)
        clip = EncodedClip(
            key=key,
            duration=audio.seconds,
            num_windows=audio.windows,
            window_seconds=self.family.window_seconds,
            max_seconds=self.family.max_seconds,
            audio=audio,
            spectrogram=self.family.spectrogram(audio),
            model_state=state,
            encode_seconds=time.perf_counter() - start,
            model_name=self.family.short_name,
        )
        self.encode_count += 1
        self.clips.put(clip)
        return clip

    def generate_kwargs(
        self,
        do_sample: bool = False,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
    ) -> dict:
        """The `generate` arguments of the page's settings; sampling defaults to the original demo's top-k/top-p."""
        if int(max_new_tokens) < 1:
            raise ValueError(f"max new tokens must be at least 1; got {max_new_tokens}.")
        kwargs = {"do_sample": bool(do_sample), "max_new_tokens": int(max_new_tokens)}
        if do_sample:
            kwargs["top_k"] = int(top_k) if top_k else DEFAULT_TOP_K
            kwargs["top_p"] = float(top_p) if top_p is not None else DEFAULT_TOP_P
            if temperature is not None:
                if float(temperature) <= 0:
                    raise ValueError(f"temperature must be above 0 for sampling; got {temperature}.")
                kwargs["temperature"] = float(temperature)
        return kwargs

    def answer_stream(
        self,
        path: str | os.PathLike,
        question: str,
        soundcot_repair: bool = False,
        seed: int | None = None,
        extra_generate_kwargs: dict | None = None,
        **settings,
    ) -> Iterator[str]:
        """
        Yields the answer to `question` about the clip at `path` as it is generated (the text so far), ending with
        the final answer. `settings` are those of `generate_kwargs`; `extra_generate_kwargs` go to `generate` as
        they are (`logits_processor`, `prefix_allowed_tokens_fn`, ...). `seed` seeds sampling once, before the
        first pass, as `torch.manual_seed` before a pipeline call does. With `soundcot_repair`, an answer that
        reasons without concluding is repaired as the original SoundCoT script does (see `soundcot_repair_prefix`).
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question is empty; type a question about the clip.")
        if soundcot_repair and not self.family.supports_soundcot_repair:
            raise ValueError(f"SoundCoT repair is for AF2-SoundCoT answers; {self.family.display_name} has none.")
        generate_kwargs = {**self.generate_kwargs(**settings), **(extra_generate_kwargs or {})}
        clip = self.encode(path)
        self.family.check_questions([question])
        final = None
        for text, tokens in self._stream(clip, question, generate_kwargs, seed):
            final = tokens
            yield text
        answer = self.family.decode_answers([final])[0]
        if soundcot_repair:
            prompt = self.processor.build_prompt(question)
            prefix = soundcot_repair_prefix(
                self.processor.decode_answers([final], skip_special_tokens=False, strip=False)[0]
            )
            if prefix is not None:
                # The original tokenises the repaired prompt with max_length=1024, truncation on.
                repaired = self.processor.tokenizer(
                    [prompt + prefix],
                    truncation=True,
                    max_length=SOUNDCOT_REPAIR_MAX_PROMPT_TOKENS,
                    return_tensors="pt",
                )
                shown = prefix.lstrip()
                yield shown
                for text, tokens in self._stream(clip, None, generate_kwargs, seed=None, prompt_ids=repaired):
                    final = tokens
                    yield shown + text
                answer = (prefix + self.processor.decode_answers([final], strip=False)[0]).strip()
        yield answer

    def answer(self, path, question, **kwargs) -> str:
        """The final answer of `answer_stream`."""
        *_, answer = self.answer_stream(path, question, **kwargs)
        return answer

    def _stream(
        self, clip: EncodedClip, question, generate_kwargs, seed, prompt_ids=None
    ) -> Iterator[tuple[str, list[int]]]:
        """Runs `generate` in a thread on `question` about the clip (from its cached features and state; or, for the
        SoundCoT repair pass, on the ready `prompt_ids`); yields (text so far, []) after each token, then (text, new
        token ids up to eos)."""
        streamer = TokenStreamer(self.processor.tokenizer)
        result: dict = {}
        if prompt_ids is None:
            inputs = self.family.question_inputs(self.model, question, clip.audio, clip.model_state)
        else:  # SoundCoT's repair pass, AF2 only (see answer_stream)
            inputs = self.family.cached_inputs(self.model, prompt_ids, clip.model_state)

        def run():
            try:
                with self._model_lock, torch.inference_mode():
                    if seed is not None:
                        torch.manual_seed(int(seed))
                    result["sequences"] = self.model.generate(**inputs, streamer=streamer, **generate_kwargs)
            except BaseException as error:  # surfaced in the caller's thread below
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=run, name="af2-demo-generate", daemon=True)
        worker.start()
        text = ""
        for text in streamer:
            yield text, []
        worker.join()
        if "error" in result:
            raise result["error"]
        new_tokens = result["sequences"][0, inputs["input_ids"].shape[1] :].tolist()
        yield text, through_first_eos([new_tokens], self.model.generation_config.eos_token_id)[0]


class TokenStreamer(BaseStreamer):
    """
    A `generate` streamer to iterate over in another thread: after every new token, the whole answer so far
    (special tokens skipped, leading whitespace dropped). Unlike `TextIteratorStreamer`, which waits for the end
    of a word, every token shows; only a token that ends inside a UTF-8 character waits for the rest of it.
    """

    def __init__(self, tokenizer, timeout: float | None = None):
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.token_ids: list[int] = []
        self._queue: queue.Queue = queue.Queue()
        self._prompt_seen = False
        self._shown = ""

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate's first call brings the prompt
            self._prompt_seen = True
            return
        self.token_ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).lstrip()
        if text != self._shown and not text.endswith("\ufffd"):
            self._shown = text
            self._queue.put(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).lstrip()
        if text != self._shown:
            self._queue.put(text)
        self._queue.put(None)

    def __iter__(self):
        while (text := self._queue.get(timeout=self.timeout)) is not None:
            yield text


# ---------------------------------------------------------------------------------------------------------------------
# What the model hears: the clip's windows drawn over its waveform and log-mel spectrogram
# ---------------------------------------------------------------------------------------------------------------------

_IMAGE_WIDTH = 960
_WAVE_HEIGHT = 72
_SPEC_HEIGHT = 128
# A dark-to-bright colour ramp (black, purple, orange, pale yellow) for the log-mel image.
_RAMP = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], dtype=np.float32)
_WINDOW_TINTS = (np.array([70, 130, 200], np.float32), np.array([40, 170, 140], np.float32))
_DROPPED_TINT = np.array([200, 60, 60], np.float32)


def _ramp(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> RGB through `_RAMP`."""
    position = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return _RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction


def _waveform_envelope(path, duration: float, columns: int) -> np.ndarray | None:
    """(columns, 2) min/max of the file's first channel per column, or None."""
    import soundfile

    try:
        with soundfile.SoundFile(str(path)) as handle:
            per_column = max(1, int(np.ceil(handle.frames / columns)))
            envelope = np.zeros((columns, 2), np.float32)
            for index in range(columns):
                block = handle.read(per_column, dtype="float32", always_2d=True)
                if not len(block):
                    break
                envelope[index] = block[:, 0].min(), block[:, 0].max()
    except Exception:
        return None
    peak = float(np.abs(envelope).max())
    return envelope / peak if peak > 0 else envelope


def render_clip(clip: EncodedClip, path=None) -> np.ndarray:
    """
    An RGB image (height, width, 3) uint8 of what the model hears of `clip`: on top the file's waveform over its
    whole length, with the model's windows as alternating tinted bands and the seconds past its limit in red; below,
    the log-mel
    spectrogram of each window the model reads (frequency upwards), the zero padding of the last window dimmed.
    The time axis is the same for both: `max(duration, windows * window length)` seconds across.
    """
    windows = clip.num_windows
    covered = windows * clip.window_seconds
    total = max(clip.duration or 0.0, covered)
    width = _IMAGE_WIDTH
    px_per_second = width / total

    def column(seconds: float) -> int:
        return int(round(seconds * px_per_second))

    image = np.full((_WAVE_HEIGHT + 4 + _SPEC_HEIGHT, width, 3), 245, np.float32)

    # Waveform panel: window bands, dropped seconds, then the envelope.
    wave = image[:_WAVE_HEIGHT]
    for index in range(windows):
        start, end = column(index * clip.window_seconds), column((index + 1) * clip.window_seconds)
        wave[:, start:end] = 245 * 0.8 + _WINDOW_TINTS[index % 2] * 0.2
    if clip.dropped_seconds > 0:
        wave[:, column(clip.max_seconds) :] = 245 * 0.7 + _DROPPED_TINT * 0.3
    duration = clip.duration or covered
    envelope = _waveform_envelope(path, duration, max(1, column(duration))) if path is not None else None
    if envelope is not None:
        middle = _WAVE_HEIGHT / 2
        for x, (low, high) in enumerate(envelope):
            top = int(middle - high * (middle - 2))
            bottom = int(middle - low * (middle - 2))
            wave[top : max(bottom, top + 1) + 1, x] = (30, 30, 60)

    # Spectrogram panel: each window's log-mel, resized to its share of the width.
    spec = image[_WAVE_HEIGHT + 4 :]
    features = clip.spectrogram  # (windows, frames, mels)
    low, high = np.percentile(features, 2), np.percentile(features, 99.5)
    scaled = (features - low) / max(high - low, 1e-6)
    rows = np.linspace(features.shape[2] - 1, 0, _SPEC_HEIGHT).round().astype(int)  # low frequencies at the bottom
    for index in range(windows):
        start, end = column(index * clip.window_seconds), column((index + 1) * clip.window_seconds)
        if end <= start:
            continue
        frames = np.linspace(0, features.shape[1] - 1, end - start).round().astype(int)
        spec[:, start:end] = _ramp(scaled[index][frames][:, rows].T)
    if clip.duration is not None and clip.duration < covered:
        spec[:, column(clip.duration) : column(covered)] *= 0.35  # zero padding, not part of the file

    # Window boundaries across both panels.
    for index in range(windows + 1):
        x = min(column(index * clip.window_seconds), width - 1)
        image[:, max(0, x - 1) : x + 1] = (255, 255, 255)
    return image.round().clip(0, 255).astype(np.uint8)


def describe_clip(clip: EncodedClip) -> str:
    """A short Markdown account of what the model reads of the clip."""
    seconds = clip.window_seconds
    lines = []
    length = "unknown length" if clip.duration is None else f"{clip.duration:.1f} s"
    windows = f"{clip.num_windows} window{'s' if clip.num_windows != 1 else ''} of {seconds:g} s"
    lines.append(f"**Clip:** {length}. **{clip.model_name} reads** {windows} (0–{clip.num_windows * seconds:g} s).")
    if clip.duration is not None and clip.duration < clip.num_windows * seconds:
        lines.append(
            f"The last window ends with {clip.num_windows * seconds - clip.duration:.1f} s of silence (padding)."
        )
    if clip.dropped_seconds > 0:
        lines.append(
            f"**Not heard:** {clip.max_seconds:g}–{clip.duration:.1f} s ({clip.dropped_seconds:.1f} s): "
            f"{clip.model_name} reads at most {clip.max_seconds:g} s."
        )
    lines.append(
        f"Picture: the waveform with {clip.model_name}'s windows tinted (red: not heard), and the log-mel spectrogram "
        "the model reads (dimmed: padding)."
    )
    lines.append(f"Encoded once in {clip.encode_seconds:.2f} s; every question about this clip reuses it.")
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------


def import_gradio():
    """`gradio`, or an ImportError that says how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(f"af2 demo needs Gradio ({error}); install it with: {install_hint('demo')}") from error
    return gradio


def build_demo(answerer: AudioQuestionAnswerer, title: str | None = None, soundcot_default: bool = False):
    """
    The Gradio page (a `gr.Blocks`, queued: one model call at a time). Its API: `/show_clip(audio)` -> (image,
    description) and `/answer(audio, question, decoding, max_new_tokens, top_k, top_p, temperature, seed,
    soundcot_repair)` -> answer (streamed).
    """
    gr = import_gradio()
    family = answerer.family
    title = title or family.display_name
    short = family.short_name

    def show_clip(audio):
        if audio is None:
            return None, ""
        try:
            clip = answerer.encode(audio)
        except (ValueError, OSError, RuntimeError) as error:
            raise gr.Error(one_line(error), title="Cannot read this audio", duration=None) from error
        return render_clip(clip, audio), describe_clip(clip)

    def answer(audio, question, decoding, max_new_tokens, top_k, top_p, temperature, seed, soundcot_repair):
        if audio is None:
            raise gr.Error("No audio yet: upload or record a clip first.", title="No audio", duration=None)
        try:
            yield from answerer.answer_stream(
                audio,
                question,
                soundcot_repair=bool(soundcot_repair),
                seed=None if seed in (None, "") or int(seed) < 0 else int(seed),
                do_sample=decoding == "sampling",
                max_new_tokens=int(max_new_tokens),
                top_k=top_k,
                top_p=top_p,
                temperature=temperature,
            )
        except (ValueError, OSError, RuntimeError) as error:
            raise gr.Error(one_line(error), title="Cannot answer", duration=None) from error

    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\n"
            f"Upload or record a clip, then ask about it. {short} hears the clip in {family.window_seconds:g} s "
            f"windows (at most {family.max_windows}, the first {family.max_seconds:g} s); the picture shows which."
        )
        with gr.Row():
            with gr.Column(scale=1):
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="audio")
                view = gr.Image(
                    label=f"What {short} hears",
                    show_label=False,
                    interactive=False,
                    elem_id="clip-view",
                    format="png",
                )
                clip_info = gr.Markdown(elem_id="clip-info")
            with gr.Column(scale=1):
                question = gr.Textbox(
                    label="Question", placeholder="What is the sound in this audio?", lines=2, elem_id="question"
                )
                gr.Examples(examples=[[q] for q in EXAMPLE_QUESTIONS], inputs=[question], label="Example questions")
                with gr.Accordion("Generation settings", open=False, elem_id="settings"):
                    decoding = gr.Radio(
                        ["greedy", "sampling"],
                        value="greedy",
                        label="Decoding (greedy: the benchmark setting; sampling: the original demo's)",
                        elem_id="decoding",
                    )
                    max_new_tokens = gr.Slider(
                        1, 1024, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens", elem_id="max-new-tokens"
                    )
                    top_k = gr.Slider(1, 200, value=DEFAULT_TOP_K, step=1, label="Top-k (sampling)")
                    top_p = gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.01, label="Top-p (sampling)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature (sampling)")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="seed")
                    soundcot = gr.Checkbox(
                        value=soundcot_default,
                        visible=family.supports_soundcot_repair,
                        label="SoundCoT repair (AF2-SoundCoT: when the answer reasons without concluding, generate "
                        "the conclusion again)",
                    )
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                answer_box = gr.Textbox(label="Answer", lines=6, interactive=False, elem_id="answer")

        # One concurrency group for everything that runs the model: visitors queue for it.
        shared = dict(concurrency_limit=1, concurrency_id="model")
        audio.change(show_clip, inputs=[audio], outputs=[view, clip_info], api_name="show_clip", **shared)
        inputs = [audio, question, decoding, max_new_tokens, top_k, top_p, temperature, seed, soundcot]
        # Ask is disabled while its answer is generated and enabled again however that ends (Gradio's page runs
        # `.then` only after a success, `.failure` after an error): one question at a time per visitor, and the page
        # shows when an answer is complete.
        asking = ask.click(lambda: gr.Button(interactive=False), outputs=[ask], api_name=False, queue=False)
        asking = asking.then(answer, inputs=inputs, outputs=[answer_box], api_name="answer", **shared)
        for after in (asking.then, asking.failure):
            after(lambda: gr.Button(interactive=True), outputs=[ask], api_name=False, queue=False)
        question.submit(answer, inputs=inputs, outputs=[answer_box], api_name=False, **shared)
    demo.queue(max_size=64)
    return demo


__all__ = [
    "AudioQuestionAnswerer",
    "ClipCache",
    "EncodedClip",
    "build_demo",
    "describe_clip",
    "import_gradio",
    "render_clip",
]
