"""Fine-tuning utilities for Audio Flamingo 2 with the transformers Trainer."""
