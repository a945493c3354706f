"""The gpt2-small preset: its names exist in sae_lens's packaged directory; offline it fails fast and clearly."""

from __future__ import annotations

import time

import pytest
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from transformer_lens.loading_from_pretrained import get_official_model_name

from saenb import load_preset
from saenb.models.hub import HubUnavailableError, reachable
from saenb.models.presets import GPT2_SMALL


def test_gpt2_small_names_exist_in_sae_lens_directory():
    directory = get_pretrained_saes_directory()  # ships inside sae_lens: read offline
    assert get_official_model_name(GPT2_SMALL.model_name) == "gpt2"
    assert GPT2_SMALL.layers == tuple(range(12))
    for source in GPT2_SMALL.sae_sources:
        assert source.release in directory, source.release
        lookup = directory[source.release]
        assert lookup.model == "gpt2-small"
        for layer in GPT2_SMALL.layers:
            sae_id = source.sae_id(layer)
            assert sae_id in lookup.saes_map, f"{sae_id} not in {source.release}"
            # the SAE id and the model hook name agree on layer and hook point
            hook = source.hook_name(layer)
            assert hook.split(".")[1] == sae_id.split(".")[1] == str(layer)
            assert hook.split(".")[-1] == sae_id.split(".")[-1]
    assert GPT2_SMALL.hook_names(("z",))[3] == "blocks.3.attn.hook_z"


def test_gpt2_small_offline_fails_fast_and_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(HubUnavailableError) as err:
        load_preset("gpt2-small", device="cpu")
    assert time.perf_counter() - t0 < 5
    message = str(err.value)
    assert "model gpt2" in message and "gpt2-small-res-jb" in message
    assert "load_preset('tiny-stdlib')" in message and "cache" in message


def test_hub_probe_is_bounded(monkeypatch):
    """With the hub allowed but unreachable (a closed local port), the probe answers within its timeout."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    t0 = time.perf_counter()
    assert reachable(timeout=3.0) is False
    assert time.perf_counter() - t0 < 4


def test_sae_loading_filters_sae_lens_model_kwargs_warning_and_nothing_else():
    """sae_lens warns on every SAE whose cfg carries model_from_pretrained_kwargs (all of the bundle's do); saenb
    loads the model with them, so `sae_loading` filters that one message, and only it."""
    import warnings

    from sae_lens import SAE

    from saenb.models.hub import sae_loading

    from .conftest import REPO

    folder = REPO / "data" / "bundles" / "tiny-stdlib" / "saes" / "blocks.0.hook_resid_pre"
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        SAE.load_from_disk(folder)
    assert any("model_from_pretrained_kwargs" in str(w.message) for w in plain), "sae_lens no longer warns"
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        with sae_loading():
            SAE.load_from_disk(folder)
            warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in quiet] == ["another warning"]
