"""The models SAE specs are trained on, and their training contexts: a preset's model keys.

tiny-stdlib has two models: "base" (`model/`) and "small" (`model_small/`, half the width, notebook 07).
Training contexts are not committed (8.7M tokens); they are re-made from the preset's corpus with its
committed tokenizer (`bundle.train_contexts`, about half a minute) and kept under data/runs/.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np

from saenb.files import REPO
from saenb.models import bundle, bundle_io
from saenb.models.presets import PresetError, get_preset

MODEL_FOLDERS = {"base": bundle_io.MODEL_DIR, "small": bundle_io.SMALL_MODEL_DIR}
RUNS = Path(os.environ.get("SAENB_RUNS", REPO / "data" / "runs"))
"""Generated work files (`SAENB_RUNS` moves them, e.g. for a test's own bundle)."""


def work_dir(preset: str) -> Path:
    """Generated, git-ignored files of a preset's SAE training (activation caches, training contexts, runs)."""
    return RUNS / f"saes-{preset}"


def bundle_root(preset) -> Path:
    """The bundle folder of a preset (a registered name or a `Preset`)."""
    p = get_preset(preset)
    if not p.is_bundle:
        raise PresetError(f"preset {preset!r} loads its SAEs from the hub; SAE specs are trained on a bundle preset "
                          "(e.g. 'tiny-stdlib')")
    return p.bundle_path


DEVICE_VARIABLE = "SAENB_TRAIN_DEVICE"
"""The environment variable that names the device SAE specs are cached, trained and evaluated on (`train_device`)."""


def train_device() -> str:
    """The device of the activation passes, trainings and quality evaluations of SAE specs: `SAENB_TRAIN_DEVICE`
    (`python -m saenb.saes ... --device cuda` sets it, and Ray's workers inherit it), "cpu" when unset. A spec's
    record says where it was trained; its SAE does not depend on the device beyond float rounding."""
    return os.environ.get(DEVICE_VARIABLE) or "cpu"


def load_model(preset: str, key: str = "base", device: str | None = None):
    """The preset's model `key` on `device` (default: `train_device()`), eval mode, weights frozen (loaded once per
    process and device)."""
    return _load_model(preset, key, device or train_device())


@cache
def _load_model(preset: str, key: str, device: str):
    if key not in MODEL_FOLDERS:
        raise PresetError(f"model key {key!r} unknown; {preset} has {sorted(MODEL_FOLDERS)}")
    model = bundle_io.load_model(bundle_root(preset), device, folder=MODEL_FOLDERS[key])
    return model.requires_grad_(False)


@cache
def train_contexts(preset: str) -> np.ndarray:
    """The preset's training contexts [n, n_ctx] (int64), in corpus order."""
    return bundle.train_contexts(bundle_root(preset), work_dir(preset) / "contexts")

