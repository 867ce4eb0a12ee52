# Two commands do everything: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
LEGACY_VENV ?= .venv-openai028
PORT ?= 9225
BIN := $(VENV)/bin

.PHONY: install legacy-client browser postgres serve test test-unit lint format bench bench-overhead bench-safety bench-previews bench-fullsize bench-tiling bench-gpu bench-gpu-prepare build containerize examples registry-image-size clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	# spandrel's torchvision from PyPI is a CUDA build: beside the CPU torch of the dev and CI
	# machines it cannot load, and transformers then fails to import. Removed where it does
	# not load; spandrel's upscalers need none of it (engine/upscalers.py).
	$(BIN)/python -c 'import torchvision' 2>/dev/null || $(BIN)/pip uninstall --quiet -y torchvision
	touch $@

# The legacy openai 0.28 client (the Prem registry's example) cannot live beside
# openai 3.x, so it gets its own virtual environment for the tests.
legacy-client: $(LEGACY_VENV)/.installed

$(LEGACY_VENV)/.installed:
	$(PYTHON) -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/pip install --quiet --disable-pip-version-check 'openai==0.28.1' pillow
	touch $@

serve: install
	$(BIN)/bentoml serve service:ImagesAPI --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The playground's browser tests drive Debian's Chromium with Playwright: browser
# downloads are impossible on these machines, so the package comes from apt.
browser:
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }

# The job store's tests start Debian's PostgreSQL (initdb, pg_ctl) on a free loopback port.
postgres:
	@test -x "$$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | tail -1)" || { apt-get update -q && apt-get install -y -q postgresql; }

test: install legacy-client browser postgres lint
	SDXL_LEGACY_PYTHON=$(abspath $(LEGACY_VENV))/bin/python $(BIN)/python -m pytest --durations=25

# The inner loop: unit tests without the slow script smoke runs (make test runs all), no
# service started, no lint.
test-unit: install
	$(BIN)/python -m pytest tests/unit -m "not slow"

bench: install bench-overhead bench-safety
	$(BIN)/python -m bench.run_cpu

# What SDXL_SAFETY_CHECKER adds per 1024x1024 image: both kinds of checker at their
# published sizes, random weights (~2 min); docs/PERFORMANCE.md, "Safety checker (CPU)".
bench-safety: install
	$(BIN)/python -m bench.safety_cpu

# What the service adds to one 256x256 render over the engine alone, paired and
# interleaved in one run (~3 min idle); docs/PERFORMANCE.md, "Service overhead".
bench-overhead: install
	$(BIN)/python -m bench.overhead_cpu

# What live previews (partial_images=3) cost a render per SDXL_PREVIEW_DECODER,
# engine alone on the tiny preset (~2 min); docs/PERFORMANCE.md, "Live previews".
bench-previews: install
	$(BIN)/python -m bench.previews_cpu

# SDXL at its published size through the service on this CPU (bf16, 256x256, 5 steps),
# beside stock diffusers on the same folders: builds ~11 GiB of random weights once
# (~/.cache/sdxl-service/bench-fullsize), ~20 min, under 20 GiB; docs/PERFORMANCE.md,
# "Full size on the CPU". Then the single-file case (the base as one original-layout file,
# written once beside it, 6.5 GiB): the service's load beside stock from_single_file,
# "Single-file load"; alone: `.venv/bin/python -m bench.fullsize --single-file-only`.
bench-fullsize: install
	$(BIN)/python -m bench.fullsize

# SDXL_VAE_TILING on the full-size VAE (random weights, bench-fullsize's folder):
# seconds, peak memory and pixel difference per size, tiled and not (~5 min);
# docs/PERFORMANCE.md, "VAE tiling on the CPU".
bench-tiling: install
	$(BIN)/python -m bench.vae_tiling

# The whole GPU run (engine, HTTP service, optimisation matrix; ~8 min) on a CUDA
# machine: bench-gpu-prepare first, where PyPI is reachable (docs/PERFORMANCE.md).
bench-gpu-prepare: install
	bash bench/gpu/prepare.sh

bench-gpu:
	bash bench/gpu/run.sh bench/out/gpu

build: install
	$(BIN)/bentoml build --version $$(git describe --always --dirty 2>/dev/null || echo dev)

# Needs a docker engine. TMPDIR inside the repo works around BentoML #5566
# (a dockerfile_template is refused when the build context is outside the cwd).
containerize: build
	mkdir -p build
	TMPDIR=$(CURDIR)/build $(BIN)/bentoml containerize stable-diffusion-xl-with-refiner:latest

# Renders the registry's example prompts through a running service (real weights).
EXAMPLES_URL ?= http://localhost:$(PORT)/v1
examples: install
	$(BIN)/python scripts/render_examples.py $(EXAMPLES_URL) $(EXAMPLES_ARGS)

# After `bentoml containerize`: records the image and its size in the registry manifest.
registry-image-size:
	@test -n "$(IMAGE)" || { echo "usage: make registry-image-size IMAGE=repo/name:TAG" >&2; exit 2; }
	scripts/registry_image_size.sh $(IMAGE)

clean:
	rm -rf $(VENV) $(LEGACY_VENV) .pytest_cache .ruff_cache
