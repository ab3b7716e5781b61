"""Answer a question about an audio file three ways: model + processor, pipeline, chat template.

    python examples/quickstart.py                                   # nvidia/audio-flamingo-2, examples/doorbell.wav
    python examples/quickstart.py --model af2-3b-hf --audio dog.wav --question "What animal is this?"

The default model is NVIDIA's original checkpoint: it is downloaded and converted on first use (cached under
$AF2_CACHE, default $HF_HOME/transformers_af2). All three ways give the same answer with greedy decoding.
"""

import argparse
from pathlib import Path

import torch
from transformers import pipeline

import transformers_af2  # noqa: F401  (registers AF2 with the Auto classes and the "audio-text-to-text" task)
from transformers_af2.loading import load_model_and_processor

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="nvidia/audio-flamingo-2", help="converted repository or original checkpoint")
parser.add_argument("--audio", default=str(Path(__file__).with_name("doorbell.wav")), help="audio file")
parser.add_argument("--question", default="What is the sound in this audio?", help="the question")
parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model, processor = load_model_and_processor(args.model, device=device, dtype=dtype)

# 1. Model + processor: AF2's prompt is built from the plain question; the answer is the text after <SEP>.
inputs = processor(text=args.question, audio=args.audio).to(model.device)
with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
print("generate:", processor.decode_answers(generated)[0])

# 2. The pipeline.
pipe = pipeline("audio-text-to-text", model=model, processor=processor)
print("pipeline:", pipe(audio=args.audio, text=args.question, max_new_tokens=args.max_new_tokens)[0]["generated_text"])

# 3. Chat messages, rendered by the processor's chat template into the same prompt (and the same ids).
messages = [
    {"role": "user", "content": [{"type": "audio", "path": args.audio}, {"type": "text", "text": args.question}]}
]
inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True).to(model.device)
with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
print("chat:    ", processor.decode_answers(generated)[0])
