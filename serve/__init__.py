"""moegi's HTTP server: an OpenAI-compatible FastAPI front end on vLLM's engine (`moegi-serve`).

It runs in the server's own process; what vLLM loads into its engine processes is
`vllm_plugins`, and the models it serves by default come from `tiny`.
"""
