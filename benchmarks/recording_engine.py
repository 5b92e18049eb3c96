"""The vLLM engine, recording every request: what it asked, when, and how many tokens came
back. The real-engine benchmark replays the recording through vLLM's offline `LLM.generate`.
The file is named by the ZOI_BENCH_RECORD environment variable."""

from __future__ import annotations

import json
import os
import time

from zero_one_instruction.config import Config
from zero_one_instruction.engines.base import Completion, Request
from zero_one_instruction.engines.vllm import VLLMEngine


class RecordingEngine(VLLMEngine):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._out = open(os.environ["ZOI_BENCH_RECORD"], "a", encoding="utf-8")  # noqa: SIM115

    async def complete(self, request: Request) -> Completion:
        began = time.time()
        completion = await super().complete(request)
        entry = {
            "prompt_token_ids": self.render(request),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "choices": list(request.choices) if request.choices else None,
            "completion_tokens": completion.completion_tokens,
            "start": began,
            "end": time.time(),
        }
        self._out.write(json.dumps(entry) + "\n")
        return completion

    def close(self) -> None:
        super().close()
        self._out.close()
