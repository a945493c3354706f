"""An ipywidgets explorer of one next-token distribution under the splices (notebook 01): pick a context, a
position and a layer; the "intuition" figure redraws (it needs a live kernel; a headless run shows the widget's
first drawing)."""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from saenb.engine.patching import next_token_distributions
from saenb.hooks import sae_layer
from saenb.models.loaded import Loaded
from saenb.output import plots
from saenb.studies.replication import context


def next_tokens(loaded: Loaded, tokens: torch.Tensor, *, seq: int, pos: int, layer: int, seed: int = 0,
                top_k: int = 25) -> widgets.interactive:
    """Sliders over the contexts and positions of `tokens` and a menu of the residual SAEs' layers, starting at
    (`seq`, `pos`, `layer`): the clean model's top_k next tokens and their log-probs under each splice."""
    hooks = {sae_layer(h): h for h in loaded.hooks("resid")}

    def draw(seq: int = seq, pos: int = pos, layer: int = layer) -> None:
        dist = next_token_distributions(loaded, hooks[layer], tokens, seq, pos, seed=seed, top_k=top_k)
        plots.next_token_logprobs(dist, title=f"layer {layer}, context {seq}, position {pos}: "
                                              f"...{context(loaded, tokens, seq, pos)!r}")
        plt.show()

    return widgets.interactive(draw, seq=widgets.IntSlider(seq, 0, len(tokens) - 1),
                               pos=widgets.IntSlider(pos, 1, tokens.shape[1] - 2),
                               layer=widgets.Dropdown(options=sorted(hooks), value=layer))
