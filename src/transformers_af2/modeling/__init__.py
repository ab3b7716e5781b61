from .configuration_audioflamingo2 import AudioFlamingo2Config
from .modeling_audioflamingo2 import (
    AudioFlamingo2AudioOutput,
    AudioFlamingo2Cache,
    AudioFlamingo2ForConditionalGeneration,
    AudioFlamingo2Model,
    AudioFlamingo2PreTrainedModel,
)

__all__ = [
    "AudioFlamingo2AudioOutput",
    "AudioFlamingo2Cache",
    "AudioFlamingo2Config",
    "AudioFlamingo2ForConditionalGeneration",
    "AudioFlamingo2Model",
    "AudioFlamingo2PreTrainedModel",
]
