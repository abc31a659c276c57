"""The one place moegi patches llm-compressor: pinned memory on machines without CUDA.

llm-compressor 0.14's sequential pipeline pins its cached activations for faster host-to-device
copies; `Tensor.pin_memory()` raises "Cannot access accelerator device when none is available"
on a CPU-only machine. Pinning is only an optimisation for copies to a GPU, so without CUDA it
is made a no-op. With CUDA nothing is patched and the pipeline runs layers on the GPU.
"""

from __future__ import annotations

from typing import Any

_patched = False


def patch_for_cpu() -> bool:
    """Apply the CPU patch when CUDA is absent; return whether it was applied."""
    global _patched
    import torch

    if torch.cuda.is_available():
        return False
    if not _patched:
        from llmcompressor.pipelines.cache import IntermediatesCache

        def pin_memory(self: Any, batch_index: int, input_names: Any = None) -> None:
            return None

        IntermediatesCache.pin_memory = pin_memory  # type: ignore[method-assign]
        _patched = True
    return True


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
