"""The model `pdserve serve` runs when no --model is given: the built-in tiny Llama, cached on disk."""
from __future__ import annotations

import os

from serving.models.make_model import make_model

DEFAULT_MODEL_SIZE = "tiny"
DEFAULT_MODEL_NAME = "tiny-llama"


def default_model_dir() -> str:
    """$XDG_CACHE_HOME/pdserve/models/tiny-llama (XDG_CACHE_HOME defaults to ~/.cache)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "pdserve", "models", DEFAULT_MODEL_NAME)


def ensure_default_model() -> str:
    """The default model's directory, generating the model there on first use.

    make_model builds in a temporary directory and renames it into place, so a directory with a
    config.json is complete; when two processes race, the loser's rename fails and it uses the
    winner's (identical) model.
    """
    model_dir = default_model_dir()
    if _is_complete(model_dir):
        return model_dir
    try:
        make_model(DEFAULT_MODEL_SIZE, model_dir, seed=0)
    except OSError:
        if not _is_complete(model_dir):
            raise
    return model_dir


def _is_complete(model_dir: str) -> bool:
    return os.path.exists(os.path.join(model_dir, "config.json"))
