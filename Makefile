# kandinsky-serve — the commands a developer and CI use.
#   make demo    run the whole system on the bundled small model and generate one image
#   make test    the full test suite (what CI runs)
#   make test-python  the Python client's tests against the stack on the small models

CARGO ?= cargo
PYTHON_REF ?= tools/reference/.venv/bin/python

.PHONY: setup build test test-python lint fmt fixtures bench bench-fewstep bench-amused bench-kd20 bench-batching bench-cpu demo chart-check fuzz soak cuda clean

## setup: install what a fresh machine lacks (idempotent; needs root for apt-get)
setup:
	@command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || { echo "could not install redis-server (tests that need Redis will fail)"; exit 1; }; }
	@$(CARGO) fetch --locked >/dev/null

## build: compile every crate and binary
build:
	$(CARGO) build --workspace --all-targets --locked

## test: run the whole test suite (Rust, then the Python client against real servers)
test:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --locked --no-tests=fail && $(CARGO) test --workspace --locked --doc; \
	else \
	  $(CARGO) test --workspace --locked; \
	fi
	bash tools/test-python-client.sh
	bash tools/gpu/test-skeleton.sh

## test-python: the Python client's tests (clients/python, venv in clients/python/.venv)
test-python:
	bash tools/test-python-client.sh

## lint: formatting and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml

## fixtures: regenerate the diffusers reference fixtures (needs Python; never run by CI)
fixtures: $(PYTHON_REF)
	$(PYTHON_REF) tools/reference/dedupe_fixtures.py --materialize
	$(PYTHON_REF) tools/reference/gen_prior.py
	$(PYTHON_REF) tools/reference/gen_decoder.py
	$(PYTHON_REF) tools/reference/gen_image_preprocess.py
	$(PYTHON_REF) tools/reference/gen_kd21.py
	$(PYTHON_REF) tools/reference/gen_fewstep.py
	$(PYTHON_REF) tools/reference/gen_amused.py
	$(PYTHON_REF) tools/reference/gen_pickles.py
	$(PYTHON_REF) tools/reference/gen_kd20.py
	$(PYTHON_REF) tools/reference/gen_kd20_vae.py
	$(PYTHON_REF) tools/reference/gen_kd20_sampling.py
	$(PYTHON_REF) tools/reference/gen_kd20_unet.py
	$(PYTHON_REF) tools/reference/gen_kd20_pipeline.py
	$(PYTHON_REF) tools/reference/dedupe_fixtures.py

$(PYTHON_REF):
	python3 -m venv tools/reference/.venv
	tools/reference/.venv/bin/pip install -q -r tools/reference/requirements.txt
	tools/reference/.venv/bin/pip install -q --no-deps -e ../shared/reference/kandinsky2-src

## bench: speed and memory benchmarks (release build)
bench:
	$(CARGO) bench -p kd-models
	$(CARGO) bench -p kd-e2e --bench e2e_latency
	E2E_MODEL=kandinsky-2-1 $(CARGO) bench -p kd-e2e --bench e2e_latency

## bench-fewstep: a few-step student (1 and 4 steps) against its teacher's 25+50 steps, services
bench-fewstep:
	$(CARGO) bench -p kd-e2e --bench fewstep_latency

## bench-amused: an aMUSEd image (12 token steps) against a Kandinsky 2.2 image (25+50), services
bench-amused:
	$(CARGO) bench -p kd-e2e --bench amused_latency

## bench-kd20: a Kandinsky 2.0 image (50 and 100 DDIM steps) against a Kandinsky 2.2 image (25+50), services
bench-kd20:
	$(CARGO) bench -p kd-e2e --bench kd20_latency

## bench-cpu: UNet, MoVQ, prior, CLIP towers and load time against PyTorch on the same weights, cores
## and inputs (full-size random weights, made once in ~/.cache/kandinsky-serve/bench-cpu)
bench-cpu:
	bash tools/bench-cpu.sh

## bench-batching: step-level batching in the denoiser on against off, 8 and 16 concurrent clients
bench-batching:
	$(CARGO) bench -p kd-e2e --bench batching

## fuzz: cargo-fuzz targets (wire tensors, request validation, images, tokenizers), FUZZ_SECONDS each
fuzz:
	bash tools/fuzz.sh

## soak: the five services as release processes under 4x load while replicas, the text encoder and Redis are killed and restarted
soak:
	$(CARGO) build --release --bins
	$(CARGO) bench -p kd-e2e --bench soak

## demo: build, start the stack on the bundled small model, generate demo.png, stop
demo:
	bash tools/demo.sh

## cuda: the CUDA build of the stages (+ gateway and kd) from PyPI's CUDA 13.0 wheels, no GPU
## needed: target/cuda-dist/ and kd-cuda-bins.tar.xz (caches in ~/.cache/kandinsky-serve/cuda)
cuda:
	bash tools/cuda-build.sh

## chart-check: lint, render, schema-validate and assert the Helm chart (PyPI needed the first time)
chart-check:
	bash tools/chart-check.sh

clean:
	$(CARGO) clean
