"""The DeepSeek-V3 architecture on HAL: config, weights, loader, the model, and generation."""

from __future__ import annotations

from hal.model.config import ConfigError, ModelConfig, tiny_config
from hal.model.deepseek import DeepseekModel, ModelError
from hal.model.loader import ModelLoadError, load_model, load_weights, save_fp8_checkpoint
from hal.model.weights import Fp8Weight, expected_shapes, random_state_dict

__all__ = [
    "ConfigError",
    "DeepseekModel",
    "Fp8Weight",
    "ModelConfig",
    "ModelError",
    "ModelLoadError",
    "expected_shapes",
    "load_model",
    "load_weights",
    "random_state_dict",
    "save_fp8_checkpoint",
    "tiny_config",
]
