"""
Loading a model as every command loads it: `load_model_and_processor` (any family, any layout, `--dtype`, `--fast`,
`--quantization`), `model_loading_options` (those options, as a command takes them) and `resolve_device`
(`--device`). Library code: the commands, the demo, the server, the caption and evaluation engines and the lmms-eval
adapter call it; it calls the family adapters (`transformers_af2.families`). Importing it imports neither torch nor
transformers.
"""

from __future__ import annotations

import logging
import os

from .utils import parse_dtype

logger = logging.getLogger(__name__)


def resolve_device(name: str):
    """The `torch.device` a command's `--device` names ("auto": the GPU when there is one), or a ValueError saying
    why it cannot run the model there."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device ({error}).") from None
    if device.type == "meta":
        raise ValueError("--device meta holds no weights and cannot generate; use cpu or cuda.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return device


def model_loading_options(
    device,
    dtype: str = "auto",
    fast: bool = False,
    quantization: str | None = None,
    model_id=None,
    original_config=None,
) -> dict:
    """
    The `dtype`, `quantization` and `linear_kernels` arguments of `load_model_and_processor` from a command's
    `--dtype`, `--fast` and `--quantization` (one place for every command). `--fast` (`presets.fast_settings`) picks
    the CPU linear kernels, and the dtype when `--dtype` is auto; with that dtype, the quantization `af2
    fast-settings` measured for `model_id` (loaded with `original_config`, `--config`) on this machine, when the
    command gives none.
    """
    from .presets import fast_settings, setting_name

    if not fast:
        return {"dtype": parse_dtype(dtype, device), "quantization": quantization, "linear_kernels": None}
    choice = fast_settings(device, model_id=model_id, original_config=original_config)
    if dtype == "auto":
        dtype = choice.dtype
        quantization = quantization if quantization is not None else choice.quantization
    logger.info("--fast: %s (%s)", setting_name(dtype, quantization), choice.reason)
    return {"dtype": parse_dtype(dtype, device), "quantization": quantization, "linear_kernels": choice.linear_kernels}


def load_model_and_processor(
    model_id: str,
    device=None,
    dtype=None,
    original_config: str | None = None,
    quantization: str | None = None,
    linear_kernels: str | None = None,
    **from_pretrained_options,
):
    """
    `(model, processor)` of any supported family (see `transformers_af2.families`): an AF2 converted repository
    (local or hub) or original-layout checkpoint (hub id or directory; converted on first use and cached, see
    `transformers_af2.hub_ids`), Audio Flamingo 3 or Music Flamingo; the family comes from `config.json`.
    `original_config` is the original AF2 inference YAML, for original-layout directories that lack one.
    `quantization`: one of `quantization.QUANTIZATION_NAMES` (`--quantization`), applied while loading (AF2; its
    audio side stays unquantized). The model keeps its plain `nn.Linear` layers; on CPU, `linear_kernels` (default
    `$AF2_LINEAR_KERNELS`) routes their products through other kernels (`modeling.cpu_linear.choose_linear_kernels`:
    "auto" measures them on this machine once). Other keyword arguments go to `from_pretrained`
    (`attn_implementation`, ...).
    """
    from .families import load_model_and_processor as load_any_family

    options = dict(from_pretrained_options)
    if quantization is not None:
        from .families import AudioFlamingo2Family, detect_family
        from .quantization import quantization_config

        family = detect_family(os.path.expanduser(model_id))
        if family is not AudioFlamingo2Family:
            raise ValueError(
                f"--quantization is measured and supported for AF2 checkpoints (which modules stay unquantized is "
                f"the model's); {model_id} is {family.display_name}: load it without --quantization."
            )
        options["quantization_config"] = quantization_config(quantization, device=device, dtype=dtype)
        if device is not None:  # quantized weights are placed while loading; they cannot all be moved afterwards
            options["device_map"] = str(device)
    model, processor = load_any_family(
        model_id, device=device, dtype=dtype, original_config=original_config, **options
    )
    if model.device.type == "cpu":
        from .modeling.cpu_linear import choose_linear_kernels, use_linear_kernels

        # $AF2_LINEAR_KERNELS: unset or "default" keeps nn.Linear's path; "auto" measures once per CPU (cached).
        use_linear_kernels(model, choose_linear_kernels(model, linear_kernels))
    return model, processor


__all__ = ["load_model_and_processor", "model_loading_options", "resolve_device"]
