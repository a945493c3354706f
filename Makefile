# Two commands do everything on a fresh clone: `make reproduce` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.saenb-installed

.PHONY: venv test reproduce score bench bundle clean-results

# torch is installed first, pinned, then the package with the pin as a constraint, so that pip never
# resolves another torch (a CUDA build of several GB).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -m ipykernel install --user --name saenb --display-name "saenb (.venv)"
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest

reproduce: venv
	$(BIN)/python -m saenb reproduce --preset tiny-stdlib

score: venv
	$(BIN)/python -m saenb score --preset tiny-stdlib

bench: venv
	$(BIN)/python bench/engine.py

# The model stages, then the bundle's own SAE sets (already committed for tiny-stdlib: nothing is retrained).
bundle: venv
	$(BIN)/python -m saenb.bundle build --out data/bundles/tiny-stdlib
	$(BIN)/python -m saenb.saes build --set base --commit
	$(BIN)/python -m saenb.saes build --set topk_sweep --commit

clean-results:
	rm -rf data/results figures data/runs/tiny-stdlib
