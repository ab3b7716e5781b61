"""af2 eval scorers against values worked out by hand, including the official rules' edge cases."""

import pytest

from transformers_af2.evaluation import mmau_string_match, normalize_answer, score_items, short_answer_match
from transformers_af2.evaluation.scoring import _average_precision, match_label

CHOICES = ["Man", "Woman", "Child", "Robot"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Man", True),
        ("man.", True),
        ("(A) Man", True),  # "a" is no word of a wrong choice here
        ("The answer is man", True),  # extra words that no wrong choice has
        ("A man, not a robot", False),  # names a wrong choice too
        ("A", False),  # a bare letter: the official rule knows no letters
        ("", False),  # empty answer
        ("   ", False),
        ("Woman", False),  # "woman" is its own word: it does not contain "man"
    ],
)
def test_mmau_official_string_match(prediction, expected):
    assert mmau_string_match("Man", prediction, CHOICES) is expected


def test_mmau_shared_words_and_letter_trap():
    choices = ["A child", "A woman", "An adult man", "A teenager"]
    # Words shared with the answer ("a") do not count against it.
    assert mmau_string_match("A woman", "(B) A woman", choices)
    # "an", "adult", "man", "child", "teenager" belong to wrong choices only.
    assert not mmau_string_match("A woman", "a woman or a child", choices)
    # The official quirk: with "A child" among the wrong choices, a letter "a" is a wrong word for answer "Man".
    assert not mmau_string_match("Man", "(A) Man", ["Man", "A child", "Robot"])


def test_mmau_scores_and_breakdown():
    rows = [
        dict(answer="Man", choices=CHOICES, prediction="man", task="sound", difficulty="easy"),
        dict(answer="Robot", choices=CHOICES, prediction="(D) Robot", task="sound", difficulty="hard"),
        dict(answer="Child", choices=CHOICES, prediction="C", task="music", difficulty="easy"),
        dict(answer="Woman", choices=CHOICES, prediction="", task="speech", difficulty="easy"),
    ]
    metrics, breakdown = score_items("mmau", rows)
    assert metrics == {"accuracy": 50.0, "count": 4}
    assert breakdown["task=sound"] == {"accuracy": 100.0, "count": 2}
    assert breakdown["task=music"] == {"accuracy": 0.0, "count": 1}
    assert breakdown["difficulty=easy"] == {"accuracy": pytest.approx(100 / 3), "count": 3}


def test_short_answers():
    assert normalize_answer(" Three dogs!") == "3 dogs"
    assert short_answer_match("yes", "Yes, a dog is barking.")
    assert not short_answer_match("yes", "no")
    assert not short_answer_match("no", "")
    assert short_answer_match("3", "three")
    assert short_answer_match("dog", "Dog.")
    assert not short_answer_match("dog", "a dog barking")  # open answers are exact matches


def test_clotho_aqa_unanimous_and_majority():
    rows = [
        dict(answers=["yes", "yes", "yes"], prediction="yes"),  # unanimous yes/no, right
        dict(answers=["no", "No", "no."], prediction="yes"),  # unanimous yes/no, wrong
        dict(answers=["dog", "dog", "dog"], prediction="Dog"),  # unanimous open, right
        dict(answers=["two", "2", "three"], prediction="2"),  # majority "2" (two == 2), right, not unanimous
        dict(answers=["car", "bus", "train"], prediction="car"),  # no majority: counts nowhere
    ]
    metrics, _ = score_items("clotho_aqa", rows)
    assert metrics["accuracy_unanimous"] == pytest.approx(200 / 3)
    assert metrics["accuracy_unanimous_yes_no"] == 50.0
    assert metrics["accuracy_unanimous_open"] == 100.0
    assert metrics["accuracy_majority"] == 75.0
    assert metrics["accuracy_majority_open"] == 100.0
    assert metrics["count"] == 5


def test_match_label():
    labels = ["dog bark", "car horn", "siren"]
    assert match_label("Dog bark.", labels) == "dog bark"
    assert match_label("the sound of a siren", labels) == "siren"
    assert match_label("a car horn and a siren", labels) is None  # two labels named
    assert match_label("", labels) is None
    assert match_label("music", labels) is None


def test_classification_accuracy_and_macro_f1():
    label_set = ["blues", "jazz", "rock"]
    rows = [
        dict(labels=["blues"], label_set=label_set, prediction="blues"),
        dict(labels=["blues"], label_set=label_set, prediction="this is jazz music"),
        dict(labels=["jazz"], label_set=label_set, prediction="Jazz."),
        dict(labels=["rock"], label_set=label_set, prediction="I do not know"),
    ]
    metrics, breakdown = score_items("classification", rows)
    assert metrics["accuracy"] == 50.0
    assert metrics["unmatched"] == 1
    # blues: tp 1, predicted 1, actual 2 -> F1 2/3; jazz: tp 1, predicted 2, actual 1 -> 2/3; rock: 0.
    assert metrics["macro_f1"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)
    assert breakdown["label=blues"] == {"accuracy": 50.0, "count": 2}


def test_multi_label_f1_and_map():
    label_set = ["dog", "rain", "speech"]
    rows = [
        dict(labels=["dog", "rain"], label_set=label_set, prediction="dog, rain"),
        dict(labels=["speech"], label_set=label_set, prediction="speech and dog"),
    ]
    metrics, _ = score_items("multi_label", rows)
    # tp 3 (dog, rain, speech), fp 1 (dog in row 2), fn 0 -> micro F1 = 6/7.
    assert metrics["micro_f1"] == pytest.approx(600 / 7)
    # AP dog: both rows score 1, one positive -> precision 1/2 at recall 1 -> 0.5; rain 1.0; speech 1.0.
    assert metrics["mAP"] == pytest.approx(100 * (0.5 + 1 + 1) / 3)


def test_average_precision_matches_sklearn_definition():
    # scores 0.9 (pos), 0.8 (neg), 0.7 (pos): AP = 1 * 0.5 + (2/3) * 0.5
    assert _average_precision([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(0.5 + 1 / 3)
    assert _average_precision([1.0, 0.0], [0, 0]) is None


def test_single_label_scorer_refuses_several_labels():
    rows = [dict(id="x", labels=["dog", "rain"], label_set=["dog", "rain"], prediction="dog")]
    with pytest.raises(ValueError, match="item 'x' has 2 labels"):
        score_items("classification", rows)


def test_unknown_scorer():
    with pytest.raises(ValueError, match="scorer 'bleu' is not one of"):
        score_items("bleu", [])


def test_fsd50k_labels_holding_and_are_matched_whole(tmp_path):
    """FSD50K writes "Male speech, man speaking" as Male_speech_and_man_speaking: naming exactly the true labels
    scores 100 (the "and" inside a label is no separator)."""
    from test_eval_tasks import tone, write_csv

    from transformers_af2.evaluation import TASKS

    truth = tmp_path / "FSD50K.ground_truth"
    rows = [
        ["1", "Male_speech_and_man_speaking,Speech,Human_voice", ""],
        ["2", "Walk_and_footsteps,Run", ""],
        ["3", "Speech,Human_voice", ""],
    ]
    data = write_csv(truth / "eval.csv", ["fname", "labels", "mids"], rows)
    vocabulary = ["Male_speech_and_man_speaking", "Speech", "Human_voice", "Walk_and_footsteps", "Run", "Dog"]
    (truth / "vocabulary.csv").write_text("".join(f"{i},{label},/m/{i}\n" for i, label in enumerate(vocabulary)))
    for name in ("1", "2", "3"):
        tone(tmp_path / "FSD50K.eval_audio" / f"{name}.wav", 300)
    items = TASKS["fsd50k"].read(data)
    assert items[0]["labels"] == ["Male speech and man speaking", "Speech", "Human voice"]
    exact = [{**item, "prediction": ", ".join(item["labels"])} for item in items]
    assert score_items("multi_label", exact)[0] == {"micro_f1": 100.0, "mAP": 100.0, "count": 3}
    # "and" between labels still separates them; a denied label does not count.
    worded = [
        {**items[0], "prediction": "male speech and man speaking and speech and human voice"},
        {**items[1], "prediction": "walk and footsteps, run, not a dog"},
        {**items[2], "prediction": "Speech; human voice."},
    ]
    assert score_items("multi_label", worded)[0]["micro_f1"] == 100.0


@pytest.mark.parametrize(
    ("task", "prediction", "expected"),
    [
        ("gtzan", "hip hop", "hiphop"),
        ("gtzan", "Hip-Hop", "hiphop"),
        ("gtzan", "This sounds like rap music.", "hiphop"),
        ("gtzan", "not hip hop, it is jazz", "jazz"),
        ("us8k", "A dog barking in the distance", "dog bark"),
        ("us8k", "gunshot", "gun shot"),
        ("us8k", "gunshots and no siren", "gun shot"),
        ("us8k", "car honking", "car horn"),
        ("cremad", "anger", "angry"),
        ("cremad", "The speaker expresses sadness.", "sad"),
        ("cremad", "not happy", None),
        ("cremad", "The speaker is not happy but sad", "sad"),
        ("cremad", "She isn't angry, she sounds happy", "happy"),
        ("cremad", "happy or sad", None),  # two labels named
    ],
)
def test_label_aliases_and_negation(task, prediction, expected):
    from transformers_af2.evaluation import TASKS

    spec = TASKS[task]
    labels = list(spec.reader_options["label_set"])
    assert match_label(prediction, labels, spec.scorer_options["aliases"]) == expected


def test_classification_scores_use_the_tasks_aliases():
    from transformers_af2.evaluation import TASKS

    label_set = list(TASKS["cremad"].reader_options["label_set"])
    rows = [
        dict(labels=["angry"], label_set=label_set, prediction="anger"),
        dict(labels=["sad"], label_set=label_set, prediction="sadness"),
        dict(labels=["happy"], label_set=label_set, prediction="not happy"),
    ]
    with_aliases, _ = score_items("classification", rows, TASKS["cremad"].scorer_options)
    assert (with_aliases["accuracy"], with_aliases["unmatched"]) == (pytest.approx(200 / 3), 1)
    without, _ = score_items("classification", rows)
    assert (without["accuracy"], without["unmatched"]) == (0.0, 3)
