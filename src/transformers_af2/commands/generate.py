"""`af2 generate`: answers to questions about audio files, printed as text, streamed, or as JSON."""

from __future__ import annotations

import json
import sys

from ..loading import load_model_and_processor, model_loading_options, resolve_device
from ..utils import DEFAULT_TOP_K, DEFAULT_TOP_P, one_line
from .options import (
    HelpFormatter,
    add_device_arguments,
    add_model_arguments,
    add_sampling_arguments,
    display,
    non_empty,
    positive_int,
    question,
    unreadable_audio_file,
)

HELP = "answer a question about one or more audio files"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help=HELP,
        formatter_class=HelpFormatter,
        description=(
            "Answer a question about audio files with Audio Flamingo 2 and print the answers.\n\n"
            "The model is a converted repository (local or hub), or a checkpoint in NVIDIA's original layout (hub id "
            "or directory), which is converted on first use and cached under $AF2_CACHE "
            "(default $HF_HOME/transformers_af2).\n\n"
            "Every file that can be answered is answered: a file that cannot be read (or whose generation fails) is "
            "reported on stderr, one line each (and as `error` in --json), and af2 exits with status 1 after "
            "printing all answers.\n\n"
            "examples:\n"
            '  af2 generate --audio dog.wav --prompt "What is the sound in this audio?"\n'
            '  af2 generate --model af2-3b-hf --audio a.wav --audio b.flac --prompt "Describe the audio." --json\n'
            '  af2 generate --model nvidia/audio-flamingo-2-SoundCoT --audio a.wav --prompt "Why is he angry?" \\\n'
            "      --max-new-tokens 1024 --sample --soundcot-repair --stream"
        ),
    )
    add_model_arguments(parser, speed_options=True)
    parser.add_argument(
        "--audio",
        action="append",
        required=True,
        metavar="FILE",
        type=non_empty("--audio"),
        help="audio file (WAV, FLAC, OGG, MP3); repeat for several files",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        type=question,
        help="the question; give it once for all files, or once per --audio in the same order",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="most tokens to generate (default: the model's generation config, 256 for converted checkpoints)",
    )
    add_sampling_arguments(parser, seed_help="for repeatable sampling")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="B", help="files per generate call")
    add_device_arguments(parser)
    parser.add_argument(
        "--soundcot-repair",
        action="store_true",
        help="for AF2-SoundCoT: when an answer reasons without concluding, cut it and generate the conclusion again "
        "(the original's repair step)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print each answer while it is generated")
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON list of {audio, prompt, answer, tokens, error} (tokens: the generated ids, up to and "
        "including eos; error: null, or why this file has no answer) instead of text",
    )
    parser.set_defaults(handler=run)


def _pair_inputs(audios: list[str], prompts: list[str]) -> list[tuple[str, str]]:
    if len(prompts) == 1:
        prompts = prompts * len(audios)
    if len(prompts) != len(audios):
        raise ValueError(
            f"got {len(audios)} --audio and {len(prompts)} --prompt; give one --prompt for all files or one per file."
        )
    return list(zip(audios, prompts))


def _check_max_new_tokens(max_new_tokens: int | None, model) -> None:
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_new_tokens is not None and positions is not None and max_new_tokens >= positions:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} does not fit the model's context of {positions} positions "
            "(prompt included); give a smaller value."
        )


def _report(index: int, several: bool, audio: str, error: BaseException | str) -> str:
    """One stderr line for a file without an answer; the file is named once."""
    message = error if isinstance(error, str) else one_line(error)
    if display(audio) not in message and audio not in message:
        message = f"{display(audio)}: {message}"
    line = f"af2 generate: error: {f'[{index + 1}] ' if several else ''}{message}"
    print(line, file=sys.stderr, flush=True)
    return message


def run(args) -> int:
    from transformers import pipeline

    from ..families import detect_family
    from ..pipelines import TASK
    from ..utils import set_seed

    pairs = _pair_inputs(args.audio, args.prompt)
    if not args.do_sample and any(v is not None for v in (args.top_k, args.top_p, args.temperature)):
        raise ValueError("--top-k, --top-p and --temperature apply to --sample only.")
    if args.stream and args.batch_size > 1:
        raise ValueError("--stream prints one answer at a time; --batch-size does not apply to it.")
    device = resolve_device(args.device)
    several = len(pairs) > 1
    errors: dict[int, str] = {}
    for index, (audio, _) in enumerate(pairs):
        if (problem := unreadable_audio_file(audio)) is not None:
            errors[index] = _report(index, several, audio, problem)
    todo = [index for index in range(len(pairs)) if index not in errors]
    answers: dict[int, dict] = {}
    family = detect_family(args.model) if todo else None
    if family is not None and not family.has_af2_pipeline:
        raise ValueError(
            f"--model {args.model} is {family.display_name}; af2 generate runs AF2's pipeline. Ask it with af2 caption "
            "(one file works too), af2 demo, or transformers' own processor and generate."
        )
    if todo:
        if args.seed is not None:
            set_seed(args.seed)
        model, processor = load_model_and_processor(
            args.model,
            device=device,
            original_config=args.config,
            **model_loading_options(device, args.dtype, args.fast, args.quantization, args.model, args.config),
        )
        _check_max_new_tokens(args.max_new_tokens, model)
        pipe = pipeline(TASK, model=model, processor=processor, device=device)
        options = {"return_tensors": True, "soundcot_repair": args.soundcot_repair, **_generate_kwargs(args)}
        if args.stream:
            _stream_answers(pipe, processor, pairs, todo, options, errors)
            return 1 if errors else 0
        inputs = [{"audio": pairs[index][0], "text": pairs[index][1]} for index in todo]
        try:
            for position, records, error in pipe.answer_each(inputs, batch_size=args.batch_size, **options):
                index = todo[position]
                if error is not None:
                    errors[index] = _report(index, several, pairs[index][0], error)
                    continue
                answers[index] = records[0]
                if not args.json:  # text: each answer as soon as it is there
                    if several:
                        print(f"[{index + 1}] {display(pairs[index][0])}")
                    print(records[0]["generated_text"], flush=True)
        except KeyboardInterrupt:
            if args.json:  # the answers so far are not lost; the rest are marked
                for index in range(len(pairs)):
                    if index not in answers and index not in errors:
                        errors[index] = "interrupted"
                _print_json(args, pairs, answers, errors)
            raise
    if args.json:
        _print_json(args, pairs, answers, errors)
    return 1 if errors else 0


def _generate_kwargs(args) -> dict:
    generate_kwargs = {"do_sample": args.do_sample}
    if args.do_sample:
        generate_kwargs.update(
            top_k=args.top_k or DEFAULT_TOP_K, top_p=DEFAULT_TOP_P if args.top_p is None else args.top_p
        )
        if args.temperature is not None:
            generate_kwargs["temperature"] = args.temperature
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    return generate_kwargs


def _stream_answers(pipe, processor, pairs, todo, options, errors) -> None:
    """--stream: a streamer follows one sequence, so the files go one by one."""
    from ..generation_utils import AnswerStreamer

    several = len(pairs) > 1
    for index in todo:
        audio, prompt = pairs[index]
        if several:
            print(f"[{index + 1}] {display(audio)}", flush=True)
        streamer = AnswerStreamer(processor, sys.stdout)
        try:
            record = pipe(audio=audio, text=prompt, streamer=streamer, **options)[0]
        except Exception as error:
            if streamer.started:  # end the partial answer's line before the error
                print(flush=True)
            errors[index] = _report(index, several, audio, error)
            continue
        if record.get("soundcot_repaired"):
            print("af2 generate: the answer above had no conclusion; printed again, repaired.", file=sys.stderr)


def _print_json(args, pairs, answers: dict, errors: dict) -> None:
    payload = []
    for index, (audio, prompt) in enumerate(pairs):
        entry = {"audio": display(audio), "prompt": prompt, "answer": None, "tokens": None, "error": None}
        if index in answers:
            record = answers[index]
            entry.update(answer=record["generated_text"], tokens=record["generated_token_ids"].tolist())
            if args.soundcot_repair:
                entry["soundcot_repaired"] = record["soundcot_repaired"]
        else:
            entry["error"] = errors.get(index, "not answered")
        payload.append(entry)
    print(json.dumps(payload, ensure_ascii=False), flush=True)
