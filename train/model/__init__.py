"""CLIP models through open_clip: build for training, load any spec for eval, convert to/from HF."""

from train.model.factory import (
    MODEL_CONFIG_DIR, ClipBundle, ModelLoadError, build_model, load_model, load_weights, read_state_dict,
    register_model_configs, save_local_dir, save_model_config,
)

__all__ = [
    "ClipBundle", "ModelLoadError", "build_model", "load_model", "save_local_dir", "save_model_config",
    "load_weights", "read_state_dict", "register_model_configs", "MODEL_CONFIG_DIR",
]
