"""
`af2 demo` with a tiny random Audio Flamingo 3 checkpoint: the answerer (in process) gives transformers' own
one-at-a-time answer and encodes a clip once; the picture and its description show AF3's 30 s windows and the
seconds past its limit; the page, started as `af2 demo --model <AF3 folder>` and driven in a real browser, shows
the clip as AF3 hears it and the answer.
"""

from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, running_af2_command
from families_fixtures import save_tiny_checkpoint, tiny_model, tiny_processor
from test_demo import CHROMEDRIVER, CHROMIUM, SERVER_START_TIMEOUT, browser  # noqa: F401 (the browser fixture)
from test_families import MAX_AUDIO_SECONDS, _noise, _reference_answer

QUESTION = "What is the sound in this audio?"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def af3():
    model, processor = tiny_model("audioflamingo3"), tiny_processor("audioflamingo3")
    processor.max_audio_len = MAX_AUDIO_SECONDS
    return model, processor


def test_answerer_gives_the_one_at_a_time_answer_and_encodes_once(af3, tmp_path):
    from transformers_af2.demo import AudioQuestionAnswerer

    model, processor = af3
    answerer = AudioQuestionAnswerer(model, processor)
    clips = [_noise(tmp_path / "a.wav", 4.0, seed=1), _noise(tmp_path / "b.wav", 40.0, seed=2)]
    answers = []
    for clip in clips:
        for question in (QUESTION, "Describe the audio."):
            answer = answerer.answer(clip, question, max_new_tokens=NEW_TOKENS)
            assert answer == _reference_answer(model, processor, question, clip)[0]
            answers.append(answer)
    assert len(set(answers)) > 1
    assert answerer.encode_count == 2
    with pytest.raises(ValueError, match="SoundCoT repair is for AF2-SoundCoT answers; Audio Flamingo 3 has none"):
        answerer.answer(clips[0], QUESTION, soundcot_repair=True)


def test_the_view_shows_af3_windows_and_dropped_seconds(af3, tmp_path):
    from transformers_af2.demo import AudioQuestionAnswerer, describe_clip, render_clip

    answerer = AudioQuestionAnswerer(*af3)
    long_clip = _noise(tmp_path / "long.wav", 75.0, seed=3)
    clip = answerer.encode(long_clip)
    assert (clip.num_windows, clip.window_seconds, clip.dropped_seconds) == (2, 30.0, pytest.approx(15.0))
    text = describe_clip(clip)
    assert "**AF3 reads** 2 windows of 30 s (0–60 s)" in text and "**Not heard:** 60–75.0 s (15.0 s)" in text
    image = render_clip(clip, long_clip)
    width = image.shape[1]
    wave_row = image[0].astype(int)
    dropped_from = int(round(60 / 75 * width))
    assert (wave_row[dropped_from + 5 :, 0] > wave_row[dropped_from + 5 :, 2]).all()  # red: not heard
    assert (wave_row[: dropped_from - 5, 2] >= wave_row[: dropped_from - 5, 0]).all()  # tinted: heard
    boundaries = np.flatnonzero((image == 255).all(axis=2).all(axis=0))
    assert len(np.unique(np.round(boundaries / width * 75 / 30).astype(int))) == 3  # 0, 30 and 60 s
    short = answerer.encode(_noise(tmp_path / "short.wav", 13.0, seed=4))
    assert short.num_windows == 1 and "ends with 17.0 s of silence" in describe_clip(short)


@pytest.fixture(scope="module")
def af3_demo_server(tmp_path_factory):
    """`af2 demo --model <tiny AF3 folder>` in its own process, and a clip with its one-at-a-time answer."""
    pytest.importorskip("gradio", reason="the [demo] extra (gradio) is not installed")
    folder = tmp_path_factory.mktemp("af3")
    save_tiny_checkpoint(folder, "audioflamingo3")
    clip = _noise(folder / "clip.wav", 5.0, seed=5)
    model, processor = tiny_model("audioflamingo3"), tiny_processor("audioflamingo3")
    expected = _reference_answer(model, processor, QUESTION, clip)[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    args = ["demo", "--model", str(folder), "--port", str(port), "--device", "cpu"]
    log = folder / "demo.log"
    with running_af2_command(
        args, log, url + "config", SERVER_START_TIMEOUT, env={"GRADIO_ANALYTICS_ENABLED": "False"}
    ) as process:
        yield url, process, clip, expected, log


def test_the_af3_demo_api_through_gradio_client(af3_demo_server):
    gradio_client = pytest.importorskip("gradio_client", reason="gradio_client comes with the [demo] extra")
    url, process, clip, expected, _ = af3_demo_server
    client = gradio_client.Client(url, verbose=False)
    wav = gradio_client.handle_file(str(clip))
    image, description = client.predict(wav, api_name="/show_clip")
    assert Path(image).is_file() and "**AF3 reads** 1 window of 30 s (0–30 s)" in description
    answer = client.predict(
        audio=wav,
        question=QUESTION,
        decoding="greedy",
        max_new_tokens=NEW_TOKENS,
        top_k=30,
        top_p=0.95,
        temperature=1.0,
        seed=-1,
        soundcot_repair=False,
        api_name="/answer",
    )
    assert answer == expected
    assert process.poll() is None


def test_the_af3_page_in_a_browser(af3_demo_server, browser, tmp_path):  # noqa: F811 (the imported fixture)
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, process, clip, expected, log = af3_demo_server
    driver = browser

    def css(selector):
        return driver.find_element(By.CSS_SELECTOR, selector)

    def wait(condition, timeout=60, what=""):
        try:
            return WebDriverWait(driver, timeout).until(condition)
        except TimeoutException:
            driver.save_screenshot(str(tmp_path / "failure.png"))
            raise AssertionError(f"timed out waiting for {what} (screenshot: {tmp_path}/failure.png)") from None

    driver.get(url)
    intro = "AF3 hears the clip in 30 s windows (at most 20, the first 600 s)"
    wait(lambda d: intro in css("body").text, what="the introduction")
    css("#audio input[type=file]").send_keys(str(clip))
    wait(lambda d: "AF3 reads 1 window of 30 s" in css("#clip-info").text, what="the clip's description")
    wait(lambda d: css("#clip-view img").get_attribute("src"), what="the clip's picture")
    assert "SoundCoT" not in css("body").text  # AF2-SoundCoT's repair is not offered for AF3
    css("#question textarea").send_keys(QUESTION)
    css("#settings button").click()
    field = wait(lambda d: css("#max-new-tokens input[type=number]"), what="the settings")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(NEW_TOKENS), Keys.TAB)
    css("#ask").click()
    wait(lambda d: css("#answer textarea").get_property("value") == expected, what=f"the answer {expected!r}")
    assert process.poll() is None and "Traceback" not in log.read_text()
