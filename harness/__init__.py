"""harness: a config-driven benchmark harness for merging multi-task CLIP models."""

__version__ = "0.1.0"
