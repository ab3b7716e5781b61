"""Run AF2-SoundCoT (nvidia/audio-flamingo-2-SoundCoT) as the original inference_CoT.py does.

    python examples/soundcot.py --audio clip.wav --question "Why is the crowd cheering?"

The original samples (top-k 30, top-p 0.95) up to 1024 new tokens, and repairs an answer that opened <REASONING> but
never wrote </CONCLUSION>: it cuts the reasoning, appends "</REASONING>\\n<CONCLUSION>" to the prompt and generates
again. `soundcot_repair=True` does exactly that. (The original also lower-cases the final answer.)
"""

import argparse
from pathlib import Path

import torch
from transformers import pipeline

import transformers_af2  # noqa: F401
from transformers_af2.loading import load_model_and_processor

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="nvidia/audio-flamingo-2-SoundCoT", help="SoundCoT, converted or original")
parser.add_argument("--audio", default=str(Path(__file__).with_name("doorbell.wav")), help="audio file")
parser.add_argument("--question", default="What is happening in this audio? Explain your reasoning.")
parser.add_argument("--max-new-tokens", type=int, default=1024, help="most tokens per pass (the original: 1024)")
parser.add_argument("--seed", type=int, default=0, help="random seed")
args = parser.parse_args()

torch.manual_seed(args.seed)
device = "cuda" if torch.cuda.is_available() else "cpu"
model, processor = load_model_and_processor(args.model, device=device)
pipe = pipeline("audio-text-to-text", model=model, processor=processor)
result = pipe(
    audio=args.audio,
    text=args.question,
    max_new_tokens=args.max_new_tokens,
    do_sample=True,
    top_k=30,
    top_p=0.95,
    soundcot_repair=True,
)[0]
print(result["generated_text"])
if result["soundcot_repaired"]:
    print("(repaired: the first answer had no conclusion)")
