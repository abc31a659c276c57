"""llm-compressor's sequential pipeline, made resumable: a killed run restarts at its layer.

A 4x7B takes hours on a CPU; llm-compressor 0.14 has no checkpointing. This is its
`SequentialPipeline.__call__` (pipelines/sequential/pipeline.py) with two additions, registered
as the `moegi_resumable` pipeline, so AWQ and the weight quantization run together in it and
each layer (subgraph) is final when it ends:

- after each layer it saves, into the run's resume folder, that layer's parameters and buffers
  (smoothed weights, scales, zero points) and the activations entering the next layer, then
  renames `progress.json`: the commit point, after the files it names are complete and synced;
- at start, with a `progress.json` from the same options, it puts the finished layers' tensors
  back (`update_offload_parameter`: the model is offloaded to disk), loads the activations,
  and carries on from the next layer.

It also prints each layer's time and the peak memory so far (and the GPU's, on CUDA).
Written by hand because no maintained library checkpoints llm-compressor's pipeline; the loop is
upstream's, kept line for line where it can be.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantize import guard

PROGRESS = "progress.json"


@dataclass
class Resume:
    """Where a run keeps its resume state, and the options it must match."""

    folder: Path
    fingerprint: dict[str, Any]
    # The candidates each layer chooses from (guard.py), and per finished layer the one it
    # kept, carried across a resume.
    candidates: tuple[str, ...] = guard.AWQ_CANDIDATES
    choices: list[str] = field(default_factory=list)

    def done(self) -> int:
        """Layers finished by an earlier run with the same options (0 for a fresh start)."""
        path = self.folder / PROGRESS
        if not path.is_file():
            return 0
        state = json.loads(path.read_text())
        if state.get("options") != self.fingerprint:
            raise ValueError(f"{self.folder} holds an interrupted run with other options "
                             f"({state.get('options')}): run it with those options to resume, "
                             "or delete the folder to start over")
        self.choices = list(state.get("choices", []))[: int(state["done"])]
        return int(state["done"])


ACTIVE: Resume | None = None  # set by run.py around oneshot(); the pipeline has no arguments


def _sync_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(path)


def _tensor_names(model: Any, subgraph: Any) -> list[str]:
    """Every parameter and buffer of the modules the subgraph calls."""
    names: list[str] = []
    for node in subgraph.graph.find_nodes(op="call_module"):
        for sub, mod in model.get_submodule(node.target).named_modules(prefix=node.target):
            names += [f"{sub}.{n}" for n, t in [*mod._parameters.items(), *mod._buffers.items()]
                      if t is not None]
    return list(dict.fromkeys(names))


def _run_all(model: Any, subgraph: Any, activations: Any) -> None:
    """The subgraph over every calibration batch (its outputs unused)."""
    for inputs in activations.iter(subgraph.input_names):
        subgraph.forward(model, **inputs)


def _decoder_layer(model: Any, subgraph: Any, targets: list[str]) -> Any:
    """The sequential target (decoder layer) a subgraph calls, or None for the last subgraph
    (the final norm and the head, which stay 16-bit)."""
    for node in subgraph.graph.find_nodes(op="call_module"):
        module = model.get_submodule(node.target)
        if type(module).__name__ in targets:
            return module
    return None


def _save(resume: Resume, model: Any, subgraph: Any, index: int, activations: Any) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for full in _tensor_names(model, subgraph):
        module, _, leaf = full.rpartition(".")
        tensors[full] = getattr(model.get_submodule(module), leaf).detach().cpu().contiguous()
    folder = resume.folder
    _sync_write(folder / f"layer-{index:04d}.safetensors", lambda p: save_file(tensors, str(p)))
    _sync_write(folder / f"acts-{index + 1:04d}.pt",
                lambda p: torch.save(activations.batch_intermediates, p))
    _sync_write(folder / PROGRESS, lambda p: p.write_text(json.dumps(
        {"done": index + 1, "options": resume.fingerprint, "choices": resume.choices})))
    (folder / f"acts-{index:04d}.pt").unlink(missing_ok=True)


def _restore(resume: Resume, model: Any, index: int) -> None:
    from compressed_tensors.offload import update_offload_parameter
    from safetensors import safe_open

    with safe_open(str(resume.folder / f"layer-{index:04d}.safetensors"), "pt") as f:
        for full in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
            module, _, leaf = full.rpartition(".")
            update_offload_parameter(model.get_submodule(module), leaf, f.get_tensor(full))


def _peaks() -> str:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = (f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
           if torch.cuda.is_available() else "")
    return f"peak RSS {rss:.2f} GiB{gpu}"


def register() -> None:
    """Register `moegi_resumable` with llm-compressor (imports it: quantize environment only)."""
    import torch
    from compressed_tensors.offload import disable_offloading, set_onload_device
    from compressed_tensors.registry import standardize_lookup_name
    from llmcompressor.core import LifecycleCallbacks, active_session
    from llmcompressor.modifiers.utils.hooks import HooksMixin
    from llmcompressor.pipelines.cache import IntermediatesCache
    from llmcompressor.pipelines.registry import CalibrationPipeline
    from llmcompressor.pipelines.sequential.helpers import trace_subgraphs
    from llmcompressor.utils.dev import get_main_device
    from llmcompressor.utils.helpers import DisableQuantization, calibration_forward_context
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    if standardize_lookup_name("moegi_resumable") in CalibrationPipeline.registered_names():
        return

    @CalibrationPipeline.register("moegi_resumable")
    class ResumablePipeline(CalibrationPipeline):  # type: ignore[misc]
        @staticmethod
        def __call__(model: Any, dataloader: Any, dataset_args: Any) -> None:
            resume = ACTIVE
            assert resume is not None, "run.py sets quantize.pipeline.ACTIVE around oneshot"
            session = active_session()
            onload = get_main_device()
            offload = torch.device(dataset_args.sequential_offload_device)
            set_onload_device(model, onload)
            targets = infer_sequential_targets(model, dataset_args.sequential_targets)
            subgraphs = trace_subgraphs(model, next(iter(dataloader)), targets,
                                        dataset_args.tracing_ignore,
                                        dataset_args.sequential_targets_per_subgraph)
            resume.folder.mkdir(parents=True, exist_ok=True)
            done = resume.done()
            LifecycleCallbacks.calibration_start()
            with contextlib.ExitStack() as stack:
                stack.enter_context(calibration_forward_context(model))
                stack.enter_context(DisableQuantization(model))
                if done:
                    for index in range(done):
                        _restore(resume, model, index)
                    saved = torch.load(resume.folder / f"acts-{done:04d}.pt", weights_only=False)
                    activations = IntermediatesCache(saved, offload)
                    print(f"resuming at layer {done + 1} of {len(subgraphs)} "
                          f"(state in {resume.folder})", flush=True)
                else:
                    activations = IntermediatesCache.from_dataloader(dataloader, onload, offload)
                session.state.loss_masks = None
                session.state.sequential_prefetch = False
                last = len(subgraphs) - 1
                for index, subgraph in enumerate(subgraphs):
                    if index < done:
                        continue
                    start = time.monotonic()
                    with disable_offloading():
                        names = _tensor_names(model, subgraph)
                        original = guard.state(model, names)
                        layer = _decoder_layer(model, subgraph, targets)
                        outputs = guard.LayerOutputs(layer or model)
                        with outputs.capture() as reference:  # the original layer's outputs
                            for batch, inputs in enumerate(activations.iter(subgraph.input_names)):
                                session.state.current_batch_idx = batch
                                subgraph.forward(model, **inputs)
                        modules = subgraph.submodules(model)
                        LifecycleCallbacks.sequential_epoch_end(modules)

                        run = functools.partial(_run_all, model, subgraph, activations)
                        with HooksMixin.disable_hooks():
                            choice = guard.keep_best(model, names, modules, original, outputs,
                                                     list(reference), run,
                                                     resume.candidates) if layer else None
                            # The next layer's inputs: this layer's outputs with the chosen
                            # weights, unquantized (as llm-compressor's own pipeline does).
                            for batch, inputs in enumerate(activations.iter(subgraph.input_names)):
                                output = subgraph.forward(model, **inputs)
                                if index < last:
                                    activations.update(batch, output)
                                    activations.delete(batch, subgraph.consumed_names)
                    if choice:
                        resume.choices.append(choice.kept)
                    _save(resume, model, subgraph, index, activations)
                    print(f"layer {index + 1}/{len(subgraphs)} quantized in "
                          f"{time.monotonic() - start:.1f} s"
                          + (f", {choice.describe()}" if choice else "") + f"; {_peaks()}",
                          flush=True)
                LifecycleCallbacks.calibration_end()
