"""distgen: distributed offline batch text generation with Hugging Face models."""

__version__ = "0.1.0"
