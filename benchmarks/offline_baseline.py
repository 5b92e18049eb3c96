"""Replay recorded requests through vLLM's offline `LLM.generate`, in one call.

Each request asks for exactly the number of tokens it produced in the recording (`ignore_eos`,
`max_tokens` = recorded count), so both sides generate the same number of tokens. Prints
`seconds generated_tokens` for the generate call alone; building the engine is not timed.

    python -m benchmarks.offline_baseline CONFIG RECORDING
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(config_path: str, recording: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from zero_one_instruction.config import load_config
    from zero_one_instruction.engines.vllm import engine_args

    entries = [json.loads(line) for line in Path(recording).read_text().splitlines()]
    llm = LLM(**engine_args(load_config(config_path)))
    prompts = [TokensPrompt(prompt_token_ids=e["prompt_token_ids"]) for e in entries]
    params = [
        SamplingParams(
            temperature=e["temperature"],
            top_p=e["top_p"],
            seed=e["seed"],
            max_tokens=max(1, e["completion_tokens"]),
            ignore_eos=e["choices"] is None,
            structured_outputs=StructuredOutputsParams(choice=e["choices"])
            if e["choices"]
            else None,
        )
        for e in entries
    ]
    began = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - began
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.llm_engine.engine_core.shutdown()
    print(seconds, tokens)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
