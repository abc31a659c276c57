"""The AutoAWQ GEMM layout (`layout.py`) and the architecture registry (`registry.py`).

Pure torch and JSON, so both stages import it: the quantize stage writes and checks
checkpoints with it, and vLLM's processes read them with it (`vllm_plugins`). It imports no
other moegi package.
"""
