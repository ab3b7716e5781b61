"""
`af2 demo`: the question answerer behind the page (in process), then the page itself, started as `af2 demo` on
127.0.0.1 and driven through `gradio_client` and a real browser (Debian's chromium through Selenium).
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, running_af2_command

QUESTION = "What is the sound in this audio?"
MAX_NEW_TOKENS = 12
# Sampling with a fixed seed: the tiny random model repeats one token under greedy decoding whatever it hears, so
# only sampled answers show that the clip and the question reach the model.
SEED = 0
SAMPLING = {"do_sample": True, "top_k": 30, "top_p": 0.95}
SERVER_START_TIMEOUT = 180
ANSWER_TIMEOUT = 600  # a safety net only: the tests wait on the answer's completion, not on the clock
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def pipeline_answer(pipe, wav, question=QUESTION, sampled=True) -> str:
    if sampled:
        torch.manual_seed(SEED)
        return pipe(audio=str(wav), text=question, max_new_tokens=MAX_NEW_TOKENS, **SAMPLING)[0]["generated_text"]
    return pipe(audio=str(wav), text=question, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]["generated_text"]


@pytest.fixture(scope="module")
def reference(loaded):
    """The pipeline's answers for the fixture clips (sampled with SEED), and the pipeline itself."""
    from transformers import pipeline

    fixture, model, processor = loaded
    pipe = pipeline("audio-text-to-text", model=model, processor=processor)
    answers = {index: pipeline_answer(pipe, fixture.wav(index)) for index in range(2)}
    # The clips must give different answers, or equal answers would prove nothing about the audio.
    assert answers[0] != answers[1]
    return pipe, answers


def write_corrupt_wav(path: Path) -> Path:
    """A file that starts like a WAV and is not one."""
    path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x07" * 40)
    return path


def write_tone(path: Path, seconds: float, rate: int = 16000) -> Path:
    time_axis = np.arange(int(seconds * rate)) / rate
    samples = (0.5 * np.sin(2 * np.pi * 440 * time_axis) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The answerer, in process
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def answerer(loaded):
    from transformers_af2.demo import AudioQuestionAnswerer

    _, model, processor = loaded
    return AudioQuestionAnswerer(model, processor)


def test_answers_equal_the_pipeline_and_each_clip_is_encoded_once(loaded, reference, answerer, tmp_path):
    fixture, _, _ = loaded
    pipe, answers = reference
    before = answerer.encode_count
    for index in range(2):
        wav = fixture.wav(index)
        assert answerer.answer(wav, QUESTION, max_new_tokens=MAX_NEW_TOKENS, seed=SEED, **SAMPLING) == answers[index]
        other = "Describe the audio."
        expected = pipeline_answer(pipe, wav, other)
        assert answerer.answer(wav, other, max_new_tokens=MAX_NEW_TOKENS, seed=SEED, **SAMPLING) == expected
        greedy = pipeline_answer(pipe, wav, sampled=False)
        assert answerer.answer(wav, QUESTION, max_new_tokens=MAX_NEW_TOKENS) == greedy
    # The same bytes under another name (a new upload) are the same clip.
    copy = shutil.copy(fixture.wav(0), tmp_path / "again.wav")
    assert answerer.answer(copy, QUESTION, max_new_tokens=MAX_NEW_TOKENS, seed=SEED, **SAMPLING) == answers[0]
    assert answerer.encode_count - before == 2


def test_the_answer_streams_and_ends_with_the_final_answer(loaded, reference, answerer):
    fixture, _, _ = loaded
    _, answers = reference
    steps = list(
        answerer.answer_stream(fixture.wav(1), QUESTION, max_new_tokens=MAX_NEW_TOKENS, seed=SEED, **SAMPLING)
    )
    assert steps[-1] == answers[1]
    texts = [step for step in steps[:-1] if step]
    assert len(texts) >= 3
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))


def test_a_bad_file_is_a_readable_error_and_the_answerer_keeps_working(loaded, reference, answerer, tmp_path):
    fixture, _, _ = loaded
    _, answers = reference
    with pytest.raises(ValueError, match=r"^corrupt\.wav: cannot decode this audio \(Error opening "):
        answerer.answer(write_corrupt_wav(tmp_path / "corrupt.wav"), QUESTION)
    with pytest.raises(FileNotFoundError, match="upload or record a clip first"):
        answerer.answer(tmp_path / "missing.wav", QUESTION)
    with pytest.raises(ValueError, match="question is empty"):
        answerer.answer(fixture.wav(0), "   ")
    with pytest.raises(ValueError, match="max new tokens must be at least 1"):
        answerer.answer(fixture.wav(0), QUESTION, max_new_tokens=0)
    assert (
        answerer.answer(fixture.wav(0), QUESTION, max_new_tokens=MAX_NEW_TOKENS, seed=SEED, **SAMPLING) == answers[0]
    )


def test_the_view_marks_the_windows_and_the_dropped_seconds_of_a_long_clip(answerer, tmp_path):
    from transformers_af2.demo import describe_clip, render_clip

    long_clip = write_tone(tmp_path / "long.wav", 125.0)
    clip = answerer.encode(long_clip)
    assert clip.num_windows == 12 and clip.dropped_seconds == pytest.approx(5.0)
    text = describe_clip(clip)
    assert "12 windows of 10 s" in text and "**Not heard:** 120–125.0 s (5.0 s)" in text

    image = render_clip(clip, long_clip)
    wave_row = image[0].astype(int)  # the waveform panel's top row, above the (normalised) envelope
    width = image.shape[1]
    dropped_from = int(round(120 / 125 * width))
    red, blue = wave_row[dropped_from + 5 :], wave_row[: dropped_from - 5]
    assert (red[:, 0] > red[:, 2]).all()  # the dropped seconds are tinted red
    assert (blue[:, 2] >= blue[:, 0]).all()  # the windows AF2 reads are tinted blue/green
    window_lines = np.flatnonzero((image[:, :, :] == 255).all(axis=2).all(axis=0))
    # 13 boundaries (0, 10, ..., 120 s), each two pixels wide except at the image's left edge.
    assert len(np.unique(np.round(window_lines / width * 125 / 10).astype(int))) == 13

    short = answerer.encode(write_tone(tmp_path / "short.wav", 13.0))
    assert short.num_windows == 2 and short.dropped_seconds == 0
    assert "ends with 7.0 s of silence" in describe_clip(short) and "Not heard" not in describe_clip(short)


# ---------------------------------------------------------------------------------------------------------------------
# The page: `af2 demo` in its own process
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_server(converted_fixture, tmp_path_factory):
    pytest.importorskip("gradio", reason="the [demo] extra (gradio) is not installed")
    port = free_port()
    log_path = tmp_path_factory.mktemp("demo") / "demo.log"
    args = ["demo", "--model", str(converted_fixture.repo), "--port", str(port), "--device", "cpu"]
    url = f"http://127.0.0.1:{port}/"
    with running_af2_command(
        args, log_path, url + "config", SERVER_START_TIMEOUT, env={"GRADIO_ANALYTICS_ENABLED": "False"}
    ) as process:
        yield url, process


def answer_arguments(audio, **overrides):
    arguments = dict(
        audio=audio,
        question=QUESTION,
        decoding="sampling",
        max_new_tokens=MAX_NEW_TOKENS,
        top_k=SAMPLING["top_k"],
        top_p=SAMPLING["top_p"],
        temperature=1.0,
        seed=SEED,
        soundcot_repair=False,
    )
    arguments.update(overrides)
    return arguments


def test_the_demo_api_through_gradio_client(demo_server, converted_fixture, reference, tmp_path):
    gradio_client = pytest.importorskip("gradio_client", reason="gradio_client comes with the [demo] extra")
    from gradio_client.exceptions import AppError

    url, process = demo_server
    _, answers = reference
    client = gradio_client.Client(url, verbose=False)
    wav = gradio_client.handle_file(str(converted_fixture.wav(0)))

    image, description = client.predict(wav, api_name="/show_clip")
    assert Path(image).is_file() and "3 windows of 10 s" in description

    job = client.submit(**answer_arguments(wav), api_name="/answer")
    assert job.result(timeout=ANSWER_TIMEOUT) == answers[0]
    outputs = job.outputs()
    assert outputs[-1] == answers[0] and len([o for o in outputs if o]) >= 3  # streamed

    with pytest.raises(AppError, match=r"corrupt\.wav: cannot decode this audio"):
        client.predict(
            **answer_arguments(gradio_client.handle_file(str(write_corrupt_wav(tmp_path / "corrupt.wav")))),
            api_name="/answer",
        )
    assert process.poll() is None
    other = gradio_client.handle_file(str(converted_fixture.wav(1)))
    assert client.predict(**answer_arguments(other), api_name="/answer") == answers[1]

    # Several visitors at once: the queue runs them one by one on the shared model, each gets its own answer.
    clips = [wav, other, wav, other]
    jobs = [gradio_client.Client(url, verbose=False).submit(**answer_arguments(c), api_name="/answer") for c in clips]
    assert [job.result(timeout=ANSWER_TIMEOUT) for job in jobs] == [answers[0], answers[1], answers[0], answers[1]]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium comes with the [demo] test dependencies")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install them")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    arguments = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"]
    # A fake microphone (a beep every second) that needs no permission prompt.
    arguments += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    for argument in arguments:
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_page_in_a_browser(demo_server, converted_fixture, reference, browser, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, process = demo_server
    pipe, answers = reference
    screenshot = Path(os.environ.get("AF2_DEMO_SCREENSHOT", tmp_path / "demo.png"))
    driver = browser

    def wait(condition, timeout=30, what=""):
        try:
            return WebDriverWait(driver, timeout).until(condition)
        except TimeoutException:
            driver.save_screenshot(str(tmp_path / "failure.png"))
            (tmp_path / "failure.html").write_text(driver.page_source)
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what} (screenshot and page: {tmp_path}/failure.*)"
            ) from None

    def css(selector):
        return driver.find_element(By.CSS_SELECTOR, selector)

    def upload(path):
        if driver.find_elements(By.CSS_SELECTOR, "#audio button[aria-label='Clear']"):
            css("#audio button[aria-label='Clear']").click()
        field = wait(EC.presence_of_element_located((By.CSS_SELECTOR, "#audio input[type=file]")), what="upload box")
        field.send_keys(str(path))

    def shown_answer():
        return css("#answer textarea").get_property("value")

    # The Ask button is disabled while an answer is generated: each time it is enabled again, an answer is complete.
    # Counted in the page (from its load on), so a fast answer cannot be missed between two polls.
    count_answers_script = """window.af2Answered = 0;
        let disabled = false;
        new MutationObserver(() => {
            const ask = document.querySelector('#ask');
            if (ask && ask.disabled) disabled = true;
            else if (ask && disabled) { disabled = false; window.af2Answered += 1; }
        }).observe(document.body, {attributes: true, childList: true, subtree: true});"""

    def ask_and_wait_for_answer(expected):
        answered = driver.execute_script("return window.af2Answered")
        css("#ask").click()
        wait(lambda d: d.execute_script("return window.af2Answered") > answered, ANSWER_TIMEOUT, "the answer to end")
        assert shown_answer() == expected, f"the page shows {shown_answer()!r}, the pipeline answers {expected!r}"

    def set_number(selector, value):
        field = css(selector)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value), Keys.TAB)

    driver.get(url)
    driver.execute_script(count_answers_script)
    upload(converted_fixture.wav(0))
    wait(lambda d: "AF2 reads" in css("#clip-info").text, what="the clip's description")
    wait(lambda d: css("#clip-view img").get_attribute("src"), what="the clip's picture")
    driver.find_element(By.XPATH, f"//button[normalize-space()='{QUESTION}']").click()  # an example question
    wait(lambda d: css("#question textarea").get_property("value") == QUESTION, what="the example in the question box")
    css("#settings button").click()
    wait(EC.element_to_be_clickable((By.CSS_SELECTOR, "#decoding input[value='sampling']")), what="settings").click()
    set_number("#max-new-tokens input[type=number]", MAX_NEW_TOKENS)
    set_number("#seed input", SEED)
    css("#settings button").click()  # fold the settings again, for the screenshot
    ask_and_wait_for_answer(answers[0])
    driver.save_screenshot(str(screenshot))

    upload(write_corrupt_wav(tmp_path / "corrupt.wav"))
    error = "corrupt.wav: cannot decode this audio (Error opening "
    wait(lambda d: error in css("body").text, what="the error message")
    css("#ask").click()
    # The page keeps both errors (the upload's and the question's) on screen until they are closed.
    wait(lambda d: css("body").text.count(error) == 2, what="the error of asking about the bad file")
    assert process.poll() is None

    upload(converted_fixture.wav(1))
    wait(lambda d: "AF2 reads" in css("#clip-info").text, what="the new clip's description")
    ask_and_wait_for_answer(answers[1])

    # Record from the (fake) microphone: the recording becomes the clip, and the answer is the pipeline's for it.
    css("#audio button[aria-label='Clear']").click()
    wait(EC.element_to_be_clickable((By.CSS_SELECTOR, "#audio button[aria-label='Record audio']")), what="mic").click()
    wait(EC.element_to_be_clickable((By.CSS_SELECTOR, "#audio .record-button")), what="record button").click()
    time.sleep(2)
    wait(EC.element_to_be_clickable((By.CSS_SELECTOR, "#audio .stop-button")), what="stop button").click()
    wait(lambda d: "AF2 reads 1 window" in css("#clip-info").text, what="the recording's description")
    recording = tmp_path / "recording.wav"
    with urllib.request.urlopen(css("#audio a[download]").get_attribute("href"), timeout=30) as response:
        recording.write_bytes(response.read())
    ask_and_wait_for_answer(pipeline_answer(pipe, recording))


def test_soundcot_repair_equals_the_pipelines(loaded, reference, answerer):
    """
    An answer that opens a reasoning section and never concludes is repaired as the pipeline repairs it. The tiny
    model never writes tags by itself, so the first pass is made to write "<REASONING>a bell. it" followed by
    what the model wants (`prefix_allowed_tokens_fn`, a standard `generate` argument); the repair pass, whose
    prompt ends with the tags the repair adds, is left free.
    """
    fixture, _, processor = loaded
    pipe, _ = reference
    tokenizer = processor.tokenizer
    forced = tokenizer("<REASONING>a bell. it", add_special_tokens=False)["input_ids"]
    max_new_tokens = len(forced) + 8  # the forced start and some free tokens, none of them a conclusion
    sep_id = tokenizer.convert_tokens_to_ids("<SEP>")
    vocabulary = list(range(len(tokenizer)))

    def first_pass_starts_reasoning(batch_id, input_ids):
        ids = input_ids.tolist()
        after_sep = ids[len(ids) - ids[::-1].index(sep_id) :]
        if "CONCLUSION" in tokenizer.decode(after_sep) or len(after_sep) >= len(forced):
            return vocabulary
        return [forced[len(after_sep)]]

    options = dict(max_new_tokens=max_new_tokens, prefix_allowed_tokens_fn=first_pass_starts_reasoning)
    expected = pipe(audio=str(fixture.wav(0)), text=QUESTION, soundcot_repair=True, do_sample=False, **options)[0]
    assert expected["soundcot_repaired"]
    assert expected["generated_text"].startswith("<reasoning>a bell</REASONING>\n<CONCLUSION>")

    steps = list(
        answerer.answer_stream(
            fixture.wav(0),
            QUESTION,
            soundcot_repair=True,
            max_new_tokens=max_new_tokens,
            extra_generate_kwargs={"prefix_allowed_tokens_fn": first_pass_starts_reasoning},
        )
    )
    assert steps[-1] == expected["generated_text"]
    # The page shows the first pass, then the repaired answer growing from the cut reasoning.
    assert any(step.startswith("<REASONING>a bell. it") for step in steps)
    assert "<reasoning>a bell</REASONING>\n<CONCLUSION>" in steps


def test_without_gradio_af2_demo_says_what_to_install(converted_fixture):
    # sys.modules["gradio"] = None makes `import gradio` fail, as in an installation without the [demo] extra.
    code = (
        "import sys; sys.modules['gradio'] = None; from transformers_af2.commands import main; "
        f"sys.exit(main(['demo', '--model', {str(converted_fixture.repo)!r}, '--device', 'cpu']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "af2 demo: error: af2 demo needs Gradio" in result.stderr
    assert "pip install 'transformers-af2[demo]'" in result.stderr
