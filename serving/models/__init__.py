"""Model definitions (one decoder for the Llama family), weight loading, and the built-in test model."""
from serving.models.causal_lm import AttentionBackend, CausalLM
from serving.models.config import SUPPORTED_ARCHITECTURES, ModelArchConfig
from serving.models.loader import load_model

__all__ = ["AttentionBackend", "CausalLM", "ModelArchConfig", "SUPPORTED_ARCHITECTURES", "load_model"]
