"""The judge's confidence: when its はい is trusted (`pipeline.min_judge_confidence`).

The probability comes from the engine (`Completion.choice_probabilities`); an engine that
cannot give it leaves it None, and then a はい passes as it always did: a threshold must not
drop every record of an engine that was never asked for what it cannot tell.
"""

from __future__ import annotations


def confident(yes_probability: float | None, minimum: float | None) -> bool:
    """Whether a はい of this probability stands; below `minimum` it counts as a いいえ."""
    return minimum is None or yes_probability is None or yes_probability >= minimum


def rejection(prefix: str, said_yes: bool | None) -> str:
    """The drop reason of a judge's rejection: a doubted はい (`*_low_confidence`) and a
    いいえ (`*_rejected`) tell a user different things to change."""
    return f"{prefix}_low_confidence" if said_yes else f"{prefix}_rejected"
