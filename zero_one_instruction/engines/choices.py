"""How likely each choice of a constrained choice was, from the log-probabilities of its tokens.

An engine that decodes a choice under a constraint (vLLM: structured outputs) can report, for
each generated token, the log-probabilities of the tokens the constraint allowed there. A
choice is rarely one token, and may be spelt by several token sequences (「は」「い」 or
「はい」), so the probability of a choice is not the probability of one token. It is read at
the position where the generated text first commits to one choice: every candidate token
there whose text (after the tokens generated before it) still leads to exactly one choice adds
its probability to that choice; the masses are then normalised over those candidates. Before
that position the text leads to several choices (a byte of a character both choices start
with), so it decides nothing. For はい/いいえ, which differ in their first character, this is
the model's probability of answering はい under the constraint, whatever the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

# Decodes token ids to text; a cut character ends in U+FFFD, as Hugging Face tokenizers do.
Decode = Callable[[Sequence[int]], str]
DIGITS = 6  # a trace holds a probability, not a float's last bits of noise
CUT = "\ufffd"


def leading_to(text: str, choices: Sequence[str]) -> list[str]:
    """The choices `text` is the beginning of; a cut last character promises nothing yet."""
    start = text.rstrip(CUT)
    return [choice for choice in choices if choice.startswith(start)]


def choice_probabilities(
    choices: Sequence[str],
    token_ids: Sequence[int],
    positions: Sequence[Mapping[int, float]],
    decode: Decode,
) -> dict[str, float] | None:
    """The probability of each choice, or None where the log-probabilities cannot tell.

    `token_ids` are the generated tokens and `positions[i]` the log-probabilities of the
    candidate tokens at position i (the allowed ones, the generated one among them).
    """
    for i, candidates in enumerate(positions[: len(token_ids)]):
        if len(leading_to(decode(token_ids[: i + 1]), choices)) != 1:
            continue  # the generated text has not committed yet
        masses = dict.fromkeys(choices, 0.0)
        for token, logprob in candidates.items():
            led = leading_to(decode([*token_ids[:i], token]), choices)
            if len(led) == 1 and math.isfinite(logprob):
                masses[led[0]] += math.exp(logprob)
        total = sum(masses.values())
        if total <= 0.0:
            return None
        return {choice: round(mass / total, DIGITS) for choice, mass in masses.items()}
    return None
