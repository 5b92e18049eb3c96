"""A tiny Llama-style model directory for trying the tool where no model can be downloaded.

The directory holds a model config and a byte-level BPE tokenizer trained on this package's own
Japanese text, with a chat template, but no weights: run it with vLLM's `load_format: dummy`,
which fills random weights. Its output is noise, but every request goes through the real
engine: chat template, batching, constrained choices, seeds, shutdown.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .errors import ZoiError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
HIDDEN, HEAD_DIM, LAYERS = 256, 64, 2  # vLLM's CPU attention rejects head_dim below 32


def _corpus() -> list[str]:
    package = resources.files(__package__)
    texts = [package.joinpath("templates/ja.yaml").read_text("utf-8")]
    texts += [
        package.joinpath(f"data/{name}").read_text("utf-8")
        for name in ("tasks_ja.txt", "domains_ja.txt")
    ]
    return [line for text in texts for line in text.splitlines() if line.strip()]


def build_tiny_model(directory: Path, vocab_size: int = 2000) -> Path:
    """Write config.json, tokenizer.json and tokenizer_config.json into `directory`."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ZoiError("tiny-model: needs the 'tokenizers' package (installed with vLLM)") from None
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    end_id = tokenizer.token_to_id("<|end|>")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|end|>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
    }
    model_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HIDDEN // HEAD_DIM,
        "num_key_value_heads": HIDDEN // HEAD_DIM,
        "head_dim": HEAD_DIM,
        "vocab_size": tokenizer.get_vocab_size(),
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": tokenizer.token_to_id("<s>"),
        "eos_token_id": end_id,
        "pad_token_id": tokenizer.token_to_id("</s>"),
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    for name, data in (("tokenizer_config.json", tokenizer_config), ("config.json", model_config)):
        (directory / name).write_text(json.dumps(data, ensure_ascii=False, indent=2), "utf-8")
    return directory
