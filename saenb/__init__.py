"""saenb: how pathological are sparse-autoencoder reconstruction errors? The workbook's helper package."""

from saenb.assembly import from_model, load_preset
from saenb.engine.interventions import Intervention, intervention
from saenb.engine.patching import measure, measure_naive
from saenb.engine.store import measure_cached
from saenb.files import __version__
from saenb.hooks import PresetError
from saenb.models.loaded import Loaded
from saenb.models.presets import Preset, SAESource, get_preset, list_presets, register_preset
from saenb.studies.pathology import score

__all__ = [
    "Intervention",
    "Loaded",
    "Preset",
    "PresetError",
    "SAESource",
    "__version__",
    "from_model",
    "get_preset",
    "intervention",
    "list_presets",
    "load_preset",
    "measure",
    "measure_cached",
    "measure_naive",
    "register_preset",
    "score",
]
