"""The tiny-model factory: moegi's own tokenizer, the default model and the test models.

`make serve`, the quantize stage, the benchmarks and the tests all use it (`build.ensure_model`);
models that need llm-compressor or mergekit are built in the quantize environment.
"""
