"""CLIP models through open_clip: build for training, load any spec for eval, convert to/from HF."""

from train.model.factory import (
    LOCAL_DIR_CONFIG, LOCAL_DIR_WEIGHTS, MODEL_CONFIG_DIR, ClipBundle, ModelLoadError, build_model, load_model,
    load_run_weights, load_weights, pixel_stats, read_state_dict, register_model_configs, save_local_dir, save_model_config,
    saved_step,
)

__all__ = [
    "ClipBundle", "ModelLoadError", "pixel_stats", "build_model", "load_model", "load_run_weights", "save_local_dir",
    "save_model_config", "saved_step", "load_weights", "read_state_dict", "register_model_configs",
    "MODEL_CONFIG_DIR", "LOCAL_DIR_CONFIG", "LOCAL_DIR_WEIGHTS",
]
