"""moegi's quantization stage: AWQ 4-bit checkpoints of merged MoE and dense models.

The AWQ search runs in llm-compressor (its own environment, `.venv-quantize`); moegi adds the
mappings as data (`mappings.json`), a Japanese + English calibration set, a repacker to the
AutoAWQ GEMM layout that vLLM, TGI and transformers read (`gemm.py`), safe output writing with a
model card, and verification (`verify.py`).
"""
