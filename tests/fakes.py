"""A fake `Engine` for unit tests: scripted text pieces, one per "token".

It behaves as vllm_engine.py configures vLLM: DELTA outputs, stop strings matched on the text
and kept in the output (the serving layer cuts them), finish_reason "length" at max_tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from serve.engine import ChoiceDelta, EngineDeadError, EngineStep, SamplingSpec, TokenLogprobs


class FakeEngine:
    def __init__(self, pieces: list[str] | None = None, *, dead: bool = False,
                 delay: float = 0.0, tokenizer: Any = None) -> None:
        self.pieces = pieces if pieces is not None else ["日本", "の", "首都", "は", "東京", "です。"]
        self.dead = dead
        self.delay = delay
        # With a tokenizer, each piece's token ids are its real encoding (several per step),
        # so text and tokens agree as they do from vLLM; without, one made-up id per piece.
        self.tokenizer = tokenizer
        self.aborted: list[str] = []
        self.steps = 0  # the progress counter
        self.requests: list[tuple[list[int], SamplingSpec]] = []

    async def generate(self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str
                       ) -> AsyncIterator[EngineStep]:
        if self.dead:
            raise EngineDeadError("fake engine died")
        self.requests.append((prompt_token_ids, spec))
        texts = ["" for _ in range(spec.n)]
        for step in range(spec.max_tokens):
            if self.delay:
                await asyncio.sleep(self.delay)
            piece = self.pieces[step] if step < len(self.pieces) else None
            choices = []
            for i in range(spec.n):
                if piece is None:  # script exhausted: the EOS token
                    choices.append(ChoiceDelta(i, "", [2], None, "stop", None))
                    continue
                texts[i] += piece
                stop = next((s for s in spec.stop if s in texts[i]), None)
                ids = (self.tokenizer.encode(piece, add_special_tokens=False)
                       if self.tokenizer is not None else [10 + step])
                lps = ([TokenLogprobs(t, -0.5, [(t, -0.5)][: spec.logprobs]) for t in ids]
                       if spec.logprobs is not None else None)
                finish = "stop" if stop else "length" if step + 1 == spec.max_tokens else None
                text = piece
                if stop:  # like vLLM: output truncated right after the stop string
                    end = texts[i].index(stop) + len(stop)
                    text = piece[: len(piece) - (len(texts[i]) - end)]
                choices.append(ChoiceDelta(i, text, ids, lps, finish, stop))
            self.steps += 1
            yield EngineStep(choices, len(prompt_token_ids))
            if all(c.finish_reason for c in choices):
                return

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("fake engine died")

    def progress(self) -> float:
        return float(self.steps)
