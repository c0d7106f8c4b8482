"""Benchmark building blocks: random checkpoints (`synth`, `presets`), honest memory and page-cache measurement
(`sysmem`), bandwidth limits (`limits`), the worker process and step timer (`decode_bench`), and the scenarios of
`hf-moe-offload bench` (`scenario_bench`, `scenario_worker`, `scenario_report`), and its llama.cpp baseline (`gguf`:
GGUF files made with llama.cpp's converter and quantizer; `llamacpp`: the llama.cpp worker), and 1 rank against N
expert-parallel ranks under the same memory limit per process (`expert_parallel_bench`, `bench --world-size N`).

Nothing is imported here: each module imports what it needs (`sysmem` only the standard library).
"""

__all__: list[str] = []
