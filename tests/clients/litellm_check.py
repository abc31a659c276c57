"""LiteLLM against moegi (run in .venv-clients): prints what the client saw, as JSON.

    python tests/clients/litellm_check.py BASE_URL MODEL QUESTION
"""

from __future__ import annotations

import json
import sys

import litellm


def main() -> None:
    url, model, question = sys.argv[1:4]
    messages = [{"role": "user", "content": question}]
    out: dict[str, object] = {}
    for prefix in ("hosted_vllm", "openai"):
        r = litellm.completion(model=f"{prefix}/{model}", api_base=url, api_key="none",
                               messages=messages, temperature=0, max_tokens=60)
        out[f"{prefix}_chat"] = r.choices[0].message.content
        stream = litellm.completion(model=f"{prefix}/{model}", api_base=url, api_key="none",
                                    messages=messages, temperature=0, max_tokens=60, stream=True,
                                    stream_options={"include_usage": True})
        chunks = list(stream)
        out[f"{prefix}_stream"] = "".join(c.choices[0].delta.content or "" for c in chunks
                                          if c.choices)
        usage = [getattr(c, "usage", None) for c in chunks]
        out[f"{prefix}_stream_usage"] = next(
            (u.completion_tokens for u in reversed(usage) if u), None)
    text = litellm.text_completion(model=f"openai/{model}", api_base=url, api_key="none",
                                   prompt=question, temperature=0, max_tokens=8)
    out["text_completion"] = text.choices[0].text
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
