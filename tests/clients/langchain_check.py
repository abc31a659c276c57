"""LangChain's ChatOpenAI against moegi (run in .venv-clients): prints what the client saw, as JSON.

    python tests/clients/langchain_check.py BASE_URL MODEL QUESTION [--structured]
"""

from __future__ import annotations

import json
import sys

from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class Answer(BaseModel):
    answer: str = Field(description="the answer, in a few words", max_length=40)


def main() -> None:
    url, model, question = sys.argv[1:4]
    llm = ChatOpenAI(base_url=url, api_key="none", model=model, temperature=0, max_tokens=60,
                     max_retries=0, stream_usage=True)
    out: dict[str, object] = {}
    if "--structured" in sys.argv:
        # json_schema (LangChain's default): the schema constrains the reply, parsed into Answer.
        schema = llm.with_structured_output(Answer, method="json_schema")
        out["json_schema"] = schema.invoke(question).model_dump()  # type: ignore[union-attr]
        # json_mode: any JSON object (the model chooses its shape), parsed into a dict.
        mode = llm.with_structured_output(Answer.model_json_schema(), method="json_mode")
        out["json_mode"] = mode.invoke(question + ' Reply in JSON as {"answer": "..."}.')
        print(json.dumps(out, ensure_ascii=False))
        return
    out["invoke"] = llm.invoke(question).content
    chunks = list(llm.stream(question))
    out["stream"] = "".join(str(c.content) for c in chunks)
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    out["stream_usage"] = usage[-1] if usage else None
    out["batch"] = [m.content for m in llm.batch([question, question])]
    responses = ChatOpenAI(base_url=url, api_key="none", model=model, temperature=0,
                           max_tokens=60, max_retries=0, use_responses_api=True)
    out["responses"] = responses.invoke(question).text
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
