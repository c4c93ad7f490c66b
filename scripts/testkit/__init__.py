"""Shared helpers for the tests, the demo and the benchmarks: boot the real ComfyUI in-process,
build architecture-faithful VAEs with random weights, and drive a headless ComfyUI server."""
