"""moegi's quantization stage: AWQ 4-bit checkpoints of merged MoE and dense models.

The AWQ search runs in llm-compressor (its own environment, `.venv-quantize`); moegi adds the
architecture registry (`awq/architectures.json`), a Japanese + English calibration set, a
repacker to the AutoAWQ GEMM layout that vLLM, TGI and transformers read (`awq/layout.py`),
safe output writing with a model card, and verification (`verify.py`). It imports `awq`,
`chat_templates` and `tiny` (test models by name), never the server (`serve`).
"""
