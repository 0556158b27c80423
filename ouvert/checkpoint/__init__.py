"""Checkpoint formats: Hugging Face directories (hf.py)."""

from ouvert.checkpoint.hf import CheckpointError, load_model, save_model

__all__ = ["CheckpointError", "load_model", "save_model"]
