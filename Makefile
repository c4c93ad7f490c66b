# make test   set everything up from nothing, then run the whole suite on ComfyUI 0.33.0 and what
#             can differ between runtimes (marker every_runtime) on ComfyUI 0.3.75 (what CI runs)
# make demo   set up, run the example workflows on a headless ComfyUI: compare with VAEDecodeTiled, then
#             stream a video into an mp4 with Save Video (Stream) and print the saved file
#             (VAE=/path/to/vae.safetensors uses a real VAE instead of a random-weight one)
# make run    set up, start ComfyUI with the pack on http://127.0.0.1:$(PORT) for the browser, every
#             template's files in place (random-weight VAEs, latents, an image)
# make bench  set up, run the benchmarks against ComfyUI's own nodes (figures in docs/BENCHMARKS.md)
# make gpu-check  everything that needs a GPU, as one table (prints a line and exits 0 without one)
# make soak   100 prompts through a real server on cpu:2, two VAEs, /free every 25 (figures)
# make bench-ray  Ray lanes on a simulated two-node cluster against local workers (figures)
# make bench-scaling  exact mode's work ratio at 2/4/8 bands, the lock-step round trip, a projection
SHELL := /bin/bash
VPY := .venv/bin/python
PORT ?= 8188
VAE ?=

.PHONY: setup test test-unit test-comfy test-e2e demo run bench gpu-check soak bench-ray bench-scaling clean

setup:
	@bash scripts/setup.sh

test:
	@bash scripts/run_tests.sh

test-unit: setup
	$(VPY) -m pytest tests/unit

test-comfy: setup
	$(VPY) -m pytest tests/comfy
	$(VPY) -m pytest tests/comfy --comfyui=.comfyui-0.3.75 -m every_runtime

test-e2e: setup
	$(VPY) -m pytest tests/e2e
	$(VPY) -m pytest tests/e2e --comfyui=.comfyui-0.3.75 -m every_runtime

demo: setup
	$(VPY) scripts/demo.py $(if $(VAE),--vae "$(VAE)")

run: setup
	$(VPY) scripts/run_comfyui.py --port $(PORT)

bench: setup
	$(VPY) benchmarks/bench_decode.py
	$(VPY) benchmarks/bench_workers.py
	$(VPY) benchmarks/bench_stream.py
	$(VPY) benchmarks/bench_exact.py
	$(VPY) benchmarks/bench_encode.py

gpu-check: setup
	$(VPY) benchmarks/gpu_check.py

soak: setup
	$(VPY) benchmarks/soak_free.py

bench-ray: setup
	$(VPY) benchmarks/bench_ray.py

bench-scaling: setup
	$(VPY) benchmarks/bench_scaling.py

clean:
	rm -rf .cache test-artifacts demo-output .pytest_cache .hypothesis
