"""AWQ quantization stage: see the quantize issue. Nothing here yet."""
