"""
`af2 serve`: Audio Flamingo 2 behind OpenAI's chat completions API, safe to put on a network.

```bash
af2 serve --model af2-3b-hf                                   # http://127.0.0.1:8000/v1/chat/completions
AF2_API_KEY=secret af2 serve --model af2-3b-hf --host 0.0.0.0 # clients send Authorization: Bearer secret
```

- `app`: the FastAPI app (routes, API key, OpenAI error bodies); `chat_request`: the request fields and their
  checks; `scheduler`: the thread that owns the model and answers queued requests in batches.
- What a client's audio may be (data, never a server path; URLs only when the operator opts in) is decided by
  `transformers_af2.audio_sources`, shared with every command that answers someone else.

Needs the `[serve]` extra (fastapi, uvicorn, pydantic, openai); the imports happen when the command runs, so
`af2 --help` does not load them. The command line (`af2 serve`'s options, the settings they make) is
`transformers_af2.commands.serve`. The app does not use transformers' own server (`transformers serve`), whose
internals differ between transformers versions.
"""

from __future__ import annotations

import os

from ..utils import install_hint

API_KEY_ENV = "AF2_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_serve_dependencies() -> None:
    """An ImportError naming what the [serve] extra would install, when some of it is missing."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"af2 serve needs {', '.join(missing)}; install them with: {install_hint('serve')}")


def resolve_model_path(model: str, original_config: str | None = None) -> str:
    """A converted repository as is; an original-layout checkpoint converted (once, cached) into one."""
    from ..convert import cached_conversion, is_original_layout

    model = os.path.expanduser(model)
    if not is_original_layout(model):
        if original_config is not None:
            raise ValueError(f"--config is for checkpoints in the original layout; {model} is not one.")
        return model
    options = {} if original_config is None else {"config": original_config}
    return str(cached_conversion(model, **options))


def load_served_model(path: str, device, loading_options: dict, attn_implementation: str | None = None):
    """`(model, processor)` of a checkpoint of any family (`transformers_af2.families`), placed on `device`, loaded as
    every command loads it (`loading.load_model_and_processor`) with `loading_options`: what
    `loading.model_loading_options` made of `--dtype`, `--fast` and `--quantization` when the server started, so that a
    reload (`/load_model`) takes the same settings whatever `af2 fast-settings` recorded since. In eval mode."""
    from ..loading import load_model_and_processor

    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return load_model_and_processor(path, device=device, **loading_options, **options)


__all__ = ["API_KEY_ENV", "LOCAL_HOSTS", "check_serve_dependencies", "load_served_model", "resolve_model_path"]
