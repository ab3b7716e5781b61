"""
The benchmark tasks `af2 eval` knows. Adding one is one `EvalTask` entry: which reader parses its files, how its
prompt is written, which scorer counts its answers.

Prompts. The original evaluates through its training data loader (`audio_flamingo_2/eval/inference.py` with
`data/data.py`): the prompt is a manifest's `prompt` field, lower-cased and stripped, between `<audio>` and `<SEP>`
(the processor does that part). NVIDIA did not publish AF2's test manifests; the prompt texts below come from what
the authors did publish: MMAU's from their answer to NVIDIA/audio-flamingo#29 and AF2's inference_CoT.jsonl
("... Choose the correct option from the following options:\\n(A) ...\\n(B) ..."), captioning's from AF2's manifest
example and inference.jsonl ("Caption the input audio."), ClothoAQA's as the bare question (AF2's README: "for AQA,
all options are provided in the prompt"; ClothoAQA has none), classification's and FSD50K's from the Audio Flamingo
manifests' per-task prompts (AF1's data.py). `--prompt` overrides a task's template.

Decoding. The original's benchmark script (`eval/inference.sh`) runs temperature 0 and 1 beam (its `num_beams` is
never passed to generate), 256 new tokens, stopping at eos: greedy decoding, `GENERATION_SETTINGS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .readers import READERS

# eval/inference.py: max_new_tokens=256, eos_token_id=tokenizer.eos_token_id, temperature 0 and num_beams 1 from
# inference.sh, no do_sample (the base model's generation config does not sample): greedy.
GENERATION_SETTINGS = {"do_sample": False, "num_beams": 1, "max_new_tokens": 256}


@dataclass(frozen=True)
class EvalTask:
    """
    One benchmark. `prompt` is a `str.format` template over the item's fields plus `{options}` (the choices as
    "(A) first\\n(B) second") and `{options_inline}` ("(A) first (B) second"); `reader` names a function of
    `readers.READERS`, called with `reader_options`; `scorer` names a function of `scoring.SCORERS`, called with
    `scorer_options` (e.g. the dataset's label aliases). `download` and `data_hint` feed the README table and `--help`.
    """

    name: str
    reader: str
    scorer: str
    prompt: str
    description: str
    download: str
    data_hint: str
    reader_options: dict = field(default_factory=dict)
    headline: str = "accuracy"
    scorer_options: dict = field(default_factory=dict)

    def read(self, data, audio_root=None) -> list[dict]:
        return functools.partial(READERS[self.reader], **self.reader_options)(data, audio_root)

    def build_prompt(self, item: dict, template: str | None = None) -> str:
        template = self.prompt if template is None else template
        fields = dict(item)
        if "choices" in item:
            lettered = [f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(item["choices"])]
            fields["options"] = "\n".join(lettered)
            fields["options_inline"] = " ".join(lettered)  # one line, as AF3's multiple-choice instruction has them
        try:
            return template.format(**fields)
        except KeyError as error:
            raise ValueError(
                f"prompt template {template!r} uses {{{error.args[0]}}}, which items of task {self.name} lack; "
                f"they have {sorted(fields)}."
            ) from None


_CREMA_D = {"ANG": "angry", "DIS": "disgusted", "FEA": "fearful", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
_GTZAN = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
_US8K = {
    code: code.replace("_", " ")
    for code in (
        "air_conditioner",
        "car_horn",
        "children_playing",
        "dog_bark",
        "drilling",
        "engine_idling",
        "gun_shot",
        "jackhammer",
        "siren",
        "street_music",
    )
}

# Other spellings of a dataset's labels that answers commonly use, read as the label when scoring (README table).
LABEL_ALIASES = {
    "gtzan": {"hiphop": ("hip hop", "hip-hop", "rap")},
    "us8k": {
        "air conditioner": ("air conditioning", "air-conditioner"),
        "car horn": ("car horns", "car honking", "honking", "horn honking"),
        "children playing": ("children play", "kids playing", "children laughing"),
        "dog bark": ("dog barking", "dog barks", "dogs barking", "barking dog", "barking"),
        "drilling": ("drill", "power drill"),
        "engine idling": ("idling engine", "engine idle", "engine running"),
        "gun shot": ("gunshot", "gunshots", "gun shots", "gunfire"),
        "jackhammer": ("jack hammer", "jackhammering"),
        "siren": ("sirens",),
        "street music": ("music on the street", "street musician"),
    },
    "cremad": {
        "angry": ("anger", "mad"),
        "disgusted": ("disgust",),
        "fearful": ("fear", "afraid", "scared"),
        "happy": ("happiness", "joy", "joyful"),
        "neutral": ("neutrality", "calm"),
        "sad": ("sadness",),
    },
}

TASKS: dict[str, EvalTask] = {
    task.name: task
    for task in (
        EvalTask(
            name="mmau",
            reader="mmau",
            scorer="mmau",
            prompt="{question} Choose the correct option from the following options:\n{options}",
            description="MMAU multiple choice (sound, music, speech); official string-match accuracy",
            download="https://github.com/Sakshi113/MMAU (mmau-test-mini.json; audio: test-mini-audios.tar.gz)",
            data_hint="mmau-test-mini.json; --audio-root: the folder holding test-mini-audios/ (default: the JSON's)",
        ),
        EvalTask(
            name="clotho_aqa",
            reader="clotho_aqa",
            scorer="clotho_aqa",
            prompt="{question}",
            description="ClothoAQA yes/no and open questions; accuracy on unanimous and majority answers",
            download="https://zenodo.org/records/6473207 (clotho_aqa_test.csv, audio_files.zip)",
            data_hint="clotho_aqa_test.csv; --audio-root: audio_files/ (default: audio_files/ beside the CSV)",
            headline="accuracy_unanimous",
        ),
        EvalTask(
            name="clotho_caption",
            reader="clotho_captions",
            scorer="captioning",
            prompt="Caption the input audio.",
            description="Clotho-v2 captioning; CIDEr-D, SPICE, SPIDEr (aac-metrics)",
            download="https://zenodo.org/records/4783391 (clotho_captions_evaluation.csv, clotho_audio_evaluation.7z)",
            data_hint="clotho_captions_evaluation.csv; --audio-root: evaluation/ (default: evaluation/ beside the CSV)",
            headline="cider_d",
        ),
        EvalTask(
            name="audiocaps_caption",
            reader="audiocaps",
            scorer="captioning",
            prompt="Caption the input audio.",
            description="AudioCaps captioning; CIDEr-D, SPICE, SPIDEr (aac-metrics)",
            download="https://github.com/cdjkim/audiocaps (dataset/test.csv; audio from YouTube by youtube_id)",
            data_hint="test.csv; --audio-root: clips named <youtube_id>, Y<youtube_id> or <audiocap_id> + extension",
            headline="cider_d",
        ),
        EvalTask(
            name="gtzan",
            reader="labels",
            scorer="classification",
            prompt="what is the genre of this music?",
            description="GTZAN genre classification; accuracy, macro F1",
            download="https://www.tensorflow.org/datasets/catalog/gtzan (genres/ folders)",
            data_hint="genres/ (one folder per genre), or a split list of genre/file.wav lines with --audio-root",
            reader_options=dict(label_set=_GTZAN, label_from="folder"),
            scorer_options=dict(aliases=LABEL_ALIASES["gtzan"]),
        ),
        EvalTask(
            name="us8k",
            reader="labels",
            scorer="classification",
            prompt="classify this sound.",
            description="UrbanSound8K sound classification; accuracy, macro F1",
            download="https://urbansounddataset.weebly.com/urbansound8k.html (metadata/UrbanSound8K.csv, audio/)",
            data_hint="metadata/UrbanSound8K.csv; --audio-root: audio/ with fold1 ... fold10 (default: ../audio from the CSV)",
            reader_options=dict(
                label_set=tuple(_US8K.values()),
                label_from="csv",
                label_map=_US8K,
                csv_columns=("slice_file_name", "class"),
                path_template="fold{fold}/{slice_file_name}",
                default_audio_root="../audio",
            ),
            scorer_options=dict(aliases=LABEL_ALIASES["us8k"]),
        ),
        EvalTask(
            name="fsd50k",
            reader="fsd50k",
            scorer="multi_label",
            prompt="describe this sound in the order from specific to general.",
            description="FSD50K sound event tagging (multi-label); mAP, micro F1",
            download="https://zenodo.org/records/4060432 (FSD50K.ground_truth/eval.csv, FSD50K.eval_audio/)",
            data_hint="FSD50K.ground_truth/eval.csv; --audio-root: FSD50K.eval_audio/ (default: beside the CSV's folder)",
            headline="mAP",
        ),
        EvalTask(
            name="cremad",
            reader="labels",
            scorer="classification",
            prompt="what is the emotion of this speech?",
            description="CREMA-D speech emotion classification; accuracy, macro F1",
            download="https://github.com/CheyneyComputerScience/CREMA-D (AudioWAV/)",
            data_hint="AudioWAV/ (files named <actor>_<sentence>_<EMOTION>_<level>.wav)",
            reader_options=dict(
                label_set=tuple(_CREMA_D.values()), label_from="filename", label_map=_CREMA_D, filename_field=("_", 2)
            ),
            scorer_options=dict(aliases=LABEL_ALIASES["cremad"]),
        ),
    )
}


def get_task(name: str) -> EvalTask:
    if name not in TASKS:
        raise ValueError(f"--task {name!r} is not a known task; choose one of {sorted(TASKS)}.")
    return TASKS[name]
