"""Published figures the notebooks set beside their own, each with its source.

    literature.GURNEE_RESID.value      # (2.2, 4.5): SAE / eps-random KL on GPT-2 small's residual stream
    literature.table()                 # every figure with what was measured and where it was published
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

GURNEE = ("Gurnee 2024, \"SAE reconstruction errors are (empirically) pathological\", AI Alignment Forum, "
          "29 March 2024 (seed 001)")
BRAUN = ("Braun, Taylor, Goldowsky-Dill & Sharkey 2024, \"Identifying Functionally Important Features with "
         "End-to-End Sparse Dictionary Learning\", arXiv:2405.12241 (code: ApolloResearch/e2e_sae)")
KARVONEN = ("Karvonen 2025, \"Revisiting End-To-End Sparse Autoencoder Training: A Short Finetune Is All You Need\", "
            "arXiv:2503.17272")
WRIGHT_SHARKEY = ("Wright & Sharkey 2024, \"Addressing Feature Suppression in SAEs\", LessWrong, "
                  "https://www.lesswrong.com/posts/3JuSjTZyMzaSeTxKk/addressing-feature-suppression-in-saes")
LEE_HEIMERSHEIM = ("Lee & Heimersheim 2024, \"Investigating Sensitive Directions in GPT-2: An Improved Baseline and "
                   "Comparative Analysis of SAEs\", arXiv:2410.12555")
ENGELS = "Engels, Riggs & Tegmark 2024, \"Decomposing The Dark Matter of Sparse Autoencoders\", arXiv:2410.14670"
CLAFLIN = "Claflin, \"NFM + SAE\" (feature integration), blog post (seed 003)"


@dataclass(frozen=True)
class Finding:
    """One published figure."""

    value: object
    """The figure: a number, a (low, high) range, a mapping of named figures, or a quoted sentence."""
    measured: str
    """What was measured, on which model."""
    source: str
    """Where it was published."""


GURNEE_RESID = Finding((2.2, 4.5), "SAE / eps-random ratio of mean KL, all-token splices, GPT-2 small's residual "
                       "stream (Bloom's hook_resid_pre SAEs), across layers", GURNEE)
GURNEE_Z = Finding((0.9, 1.7), "the same on GPT-2 small's attention outputs (hook_z SAEs, heads concatenated)", GURNEE)
GURNEE_SINGLE_TOKEN = Finding(2.0, "single-token splices (position 32 of 128): the SAE / eps-random KL ratio stays "
                              "above this at the patched token and the next", GURNEE)
BRAUN_CE_DELTA = Finding({"local": 0.228, "e2e": 0.099, "e2e+ds": 0.124}, "CE loss increase of the splice, GPT-2 small "
                         "layer 6, L0 about 40 (Table 3)", BRAUN)
BRAUN_RATIO = Finding({"local (L0 43)": 2.39, "local (L0 513)": 0.80, "e2e+ds": 0.2, "e2e": 0.01},
                      "SAE / eps-random KL ratio on their GPT-2 small layer 6 SAEs (local SAEs from L0 43 to L0 513; "
                      "the e2e SAEs' errors lie largely along -x, which LayerNorm absorbs)", BRAUN)
KARVONEN_CE_GAP_CUT = Finding((0.20, 0.50), "relative cut of the CE-loss gap by a short KL + MSE fine-tune", KARVONEN)
WRIGHT_SHARKEY_PPL_CUT = Finding(0.24, "relative cut of the perplexity increase by fine-tuning against feature "
                                 "suppression (Pythia-70M)", WRIGHT_SHARKEY)
LEE_HEIMERSHEIM_COV = Finding("with a covariance-matched random direction the gap on GPT-2 small \"no longer seems "
                              "pathologically high\", varying by layer", "the SAE's KL against a cov-random baseline "
                              "instead of an isotropic one", LEE_HEIMERSHEIM)
ENGELS_VARIANCE = Finding(0.5, "share of the SAE error's variance linearly predictable from x", ENGELS)
ENGELS_NORM_R2 = Finding(0.9, "R^2 of the SAE error's norm predicted linearly from x (over 90%)", ENGELS)
CLAFLIN_NFM = Finding({"error_reduction": 0.23, "kl_reduction": 0.299, "ratio_sae": 2.99, "ratio_nfm": 2.10,
                       "interaction_share": 0.045},
                      "an NFM on the SAE's latents, GPT-2 small: relative cut of the squared reconstruction error and "
                      "of the splice's KL, SAE and SAE + NFM over eps-random, the interaction part's share of the "
                      "NFM's output", CLAFLIN)

FINDINGS = {name: value for name, value in globals().items() if isinstance(value, Finding)}
"""Every finding above by its name here."""


def table() -> pd.DataFrame:
    """One row per finding: name, value, what was measured and its source."""
    return pd.DataFrame([{"name": name, "value": f.value, "measured": f.measured, "source": f.source}
                         for name, f in FINDINGS.items()])
