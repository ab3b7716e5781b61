"""Audio Flamingo 2 as a first-class transformers model.

Importing this package registers AF2 with transformers' Auto classes (config, model, feature extractor,
processor), so `AutoModel.from_pretrained(converted_dir)` and friends work, and registers the pipeline task
"audio-text-to-text" (see `transformers_af2.pipelines`).
"""

# First: importing it quiets torchao's expected CUDA-extension failures on CPU-only PyTorch, and transformers imports
# torchao (when installed) as soon as it is imported.
from . import quantization  # noqa: F401

# isort: split
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForMultimodalLM, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

from . import hub_ids
from ._version import __version__
from .modeling import (
    AudioFlamingo2AudioOutput,
    AudioFlamingo2Cache,
    AudioFlamingo2Config,
    AudioFlamingo2ForConditionalGeneration,
    AudioFlamingo2Model,
    AudioFlamingo2PreTrainedModel,
)
from .pipelines import AudioTextToTextPipeline, register_pipelines
from .processing import AudioFlamingo2FeatureExtractor, AudioFlamingo2Processor

AutoConfig.register(AudioFlamingo2Config.model_type, AudioFlamingo2Config, exist_ok=True)
# Users write AutoModel.from_pretrained(...) and then generate(): both Auto classes give the generation model.
AutoModel.register(AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration, exist_ok=True)
# `pipeline("any-to-any")` and transformers' server (`af2 serve`) decide whether a model is multimodal from this static
# dict, which `register` above does not update (the server then drops `input_audio` and fails to pick the class).
# The lazy mapping behind the Auto class reads only model types of `CONFIG_MAPPING_NAMES`, so the entry changes
# nothing else.
MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES.setdefault(
    AudioFlamingo2Config.model_type, AudioFlamingo2ForConditionalGeneration.__name__
)
AutoFeatureExtractor.register(AudioFlamingo2Config, AudioFlamingo2FeatureExtractor, exist_ok=True)
AutoProcessor.register(AudioFlamingo2Config, AudioFlamingo2Processor, exist_ok=True)
# pipeline("audio-text-to-text").
register_pipelines()
# Original-layout checkpoints (the released hub ids, their fine-tunes) wherever a model id is taken; see hub_ids.py.
hub_ids.install()

__all__ = [
    "AudioFlamingo2AudioOutput",
    "AudioFlamingo2Cache",
    "AudioFlamingo2Config",
    "AudioFlamingo2FeatureExtractor",
    "AudioFlamingo2ForConditionalGeneration",
    "AudioFlamingo2Model",
    "AudioFlamingo2PreTrainedModel",
    "AudioFlamingo2Processor",
    "AudioTextToTextPipeline",
    "__version__",
]
