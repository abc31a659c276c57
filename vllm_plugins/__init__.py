"""What vLLM loads into its own processes: moegi's three `vllm.general_plugins` (pyproject.toml).

- `awq_cpu`: the hook; 4-bit AutoAWQ layers on CPUs run on moegi's int4 kernels where vLLM has
  none (MoE experts without AMX) or a slower one (dense projections at small batches);
- `int4_cpu`: those kernels and their weight layout, pure torch (no vLLM import);
- `mergekit_layout`: Mixtral checkpoints with fused experts, as mergekit-moe writes them;
- `orphans`: engine processes end with the process that started them.

vLLM imports each entry point in every process it starts (the API server, the engine core, its
workers), so nothing here may import the HTTP server (`serve`) or the quantize stage.
"""
