"""saenb: how pathological are sparse-autoencoder reconstruction errors? The workbook's helper package."""

from saenb.engine.patching import measure, measure_naive
from saenb.models.presets import (
    Loaded,
    Preset,
    PresetError,
    SAESource,
    get_preset,
    list_presets,
    load_preset,
    register_preset,
)
from saenb.studies import baselines, nfm  # noqa: F401  (register the fitted baselines and sae_nfm interventions)
from saenb.studies.pathology import score

__version__ = "0.3.2"

__all__ = [
    "Loaded",
    "Preset",
    "PresetError",
    "SAESource",
    "get_preset",
    "list_presets",
    "load_preset",
    "measure",
    "measure_naive",
    "register_preset",
    "score",
]
