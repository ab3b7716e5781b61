"""Print an answer while it is generated, with TextStreamer (to the terminal) or TextIteratorStreamer (anywhere).

python examples/stream.py [--model af2-3b-hf] [--audio examples/doorbell.wav]
"""

import argparse
from pathlib import Path
from threading import Thread

import torch
from transformers import TextIteratorStreamer, TextStreamer

import transformers_af2  # noqa: F401
from transformers_af2.loading import load_model_and_processor

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="nvidia/audio-flamingo-2", help="converted repository or original checkpoint")
parser.add_argument("--audio", default=str(Path(__file__).with_name("doorbell.wav")), help="audio file")
parser.add_argument("--question", default="Describe the audio in detail.", help="the question")
parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
args = parser.parse_args()

model, processor = load_model_and_processor(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
inputs = processor(text=args.question, audio=args.audio).to(model.device)

# To stdout: skip the prompt and the special tokens (eos, <|endofchunk|>).
streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)

# To your own code: generate in a thread, read the text pieces as they come.
streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
thread = Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer))
thread.start()
pieces = list(streamer)
thread.join()
print("collected:", "".join(pieces).strip())
