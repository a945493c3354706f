"""An ipywidgets explorer of one next-token distribution under the splices (notebook 01): pick a context, a
position and a layer; the "intuition" figure redraws (it needs a live kernel; a headless run shows the explorer's
first drawing)."""

from __future__ import annotations

import base64
import io

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from saenb.engine.patching import next_token_distributions
from saenb.hooks import sae_layer
from saenb.models.loaded import Loaded
from saenb.output import plots
from saenb.studies.replication import context


def next_tokens(loaded: Loaded, tokens: torch.Tensor, *, seq: int, pos: int, layer: int, seed: int = 0,
                top_k: int = 25) -> widgets.VBox:
    """Sliders over the contexts and positions of `tokens` and a menu of the residual SAEs' layers, starting at
    (`seq`, `pos`, `layer`): the clean model's top_k next tokens and their log-probs under each splice.

    Laid out as `widgets.interactive` lays out its controls (the same CSS class), but the figure is set into the
    output widget as a PNG (`Output.outputs`), not captured by `with output:` as `interactive` does: under papermill
    (nbclient), that capture left the cell waiting for a reply now and then, with kernel and client both idle."""
    hooks = {sae_layer(h): h for h in loaded.hooks("resid")}
    controls = {"seq": widgets.IntSlider(seq, 0, len(tokens) - 1, description="seq"),
                "pos": widgets.IntSlider(pos, 1, tokens.shape[1] - 2, description="pos"),
                "layer": widgets.Dropdown(options=sorted(hooks), value=layer, description="layer")}
    out = widgets.Output()

    def draw(_change=None) -> None:
        s, p, layer_ = (controls[k].value for k in ("seq", "pos", "layer"))
        dist = next_token_distributions(loaded, hooks[layer_], tokens, s, p, seed=seed, top_k=top_k)
        fig = plots.next_token_logprobs(dist, title=f"layer {layer_}, context {s}, position {p}: "
                                                    f"...{context(loaded, tokens, s, p)!r}")
        png = io.BytesIO()
        fig.savefig(png, format="png", bbox_inches="tight")
        plt.close(fig)
        out.outputs = ({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(png.getvalue()).decode(),
                                 "text/plain": "<the intuition figure>"}},)

    for widget in controls.values():
        widget.observe(draw, names="value")
    draw()
    box = widgets.VBox([*controls.values(), out])
    box.add_class("widget-interact")
    return box
