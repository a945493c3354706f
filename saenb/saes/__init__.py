"""SAEs as declared data: where they are declared (`sets`), what names them (`spec`), how they are trained
(`train`, on activations computed once per hook: `activations`) and where they are stored and loaded
(`library`).

    spec = saenb.saes.sets.FIXES_BASE                # an SAESpec
    sae = saenb.saes.load(spec)                      # committed bundle, else local cache, else trained here
    [s.name for s in saenb.saes.sets.get("fixes")]   # notebook 08's SAEs

`python -m saenb.saes build --set fixes` trains a set's missing SAEs (resumable: each is stored as it finishes).
"""

from saenb.saes import sets
from saenb.saes.library import SpecError, find, load, record
from saenb.saes.spec import ARCHITECTURES, FINETUNES, OBJECTIVES, FineTune, SAESpec

__all__ = ["ARCHITECTURES", "FINETUNES", "OBJECTIVES", "FineTune", "SAESpec", "SpecError", "find", "load", "record",
           "sets"]
