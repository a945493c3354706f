"""Is the Hugging Face hub usable right now? Answered in seconds, never by a 25-second retry loop.

Hub presets call `require(...)` before any download: when what they need is neither in the local cache nor
reachable, they fail at once with a message that names the fix.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from urllib.parse import urlparse

from datasets.load import CachedDatasetModuleFactory
from huggingface_hub import constants, try_to_load_from_cache

PROBE_TIMEOUT_S = 3.0
FIX = (
    "Fix: run once with network access (the files are then cached), or fill the HF cache (HF_HOME) from a "
    "machine that has it, or use the offline preset: load_preset('tiny-stdlib')."
)


@contextlib.contextmanager
def sae_loading():
    """Load SAEs without sae_lens's UserWarning "This SAE has non-empty model_from_pretrained_kwargs ...", which
    asks the reader to load the model with the SAE's `model_from_pretrained_kwargs`: saenb always does (hub presets
    and `score` pass them to `from_pretrained`; bundle models are stored with them applied). That one message is
    filtered, at the loading call only; every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs",
                                category=UserWarning)
        yield


class HubUnavailableError(OSError):
    """Files needed from the Hugging Face hub are not cached and the hub cannot be reached."""


def offline_forced() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub endpoint (HF_ENDPOINT), bounded by `timeout` in all."""
    if offline_forced():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    deadline = time.monotonic() + timeout
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # bounds the DNS lookup too
    try:
        infos = socket.getaddrinfo(endpoint.hostname, endpoint.port or 443, type=socket.SOCK_STREAM)
        for *_, addr in infos:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                socket.create_connection(addr[:2], timeout=left).close()
                return True
            except OSError:
                continue
        return False
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def cached(repo_id: str, filename: str, repo_type: str = "model") -> bool:
    # read the cache folder at call time (constants.HF_HUB_CACHE), not at import time
    found = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE, repo_type=repo_type)
    return isinstance(found, str)


def dataset_cached(name: str) -> bool:
    """Whether `datasets` holds a prepared copy of hub dataset `name` (what it loads when the hub is offline)."""
    try:
        CachedDatasetModuleFactory(name).get_module()
        return True
    except FileNotFoundError:
        return False


def require(what: str, missing: list[str]) -> None:
    """Pass when nothing is missing from the cache (then never touch the network) or the hub is reachable."""
    if not missing:
        os.environ["HF_HUB_OFFLINE"] = "1"
        return
    if reachable():
        return
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    raise HubUnavailableError(
        f"{what} needs files from the Hugging Face hub that are not in the local cache ({shown}), and the "
        f"hub cannot be reached. {FIX}"
    )
