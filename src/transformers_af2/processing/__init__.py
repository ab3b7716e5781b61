from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor
from .processing_audioflamingo2 import AudioFlamingo2Processor

__all__ = ["AudioFlamingo2FeatureExtractor", "AudioFlamingo2Processor"]
