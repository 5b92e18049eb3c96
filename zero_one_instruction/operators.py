"""Depth operators: the ways a depth step makes a prompt harder, and the draw of one per step.

Evol-Instruct evolves a prompt in depth in five ways; data made by one of them all looks
alike, and a model trained on it learns one kind of request. Each depth step draws one
operator by the weights of `pipeline.depth_operators`, from a number derived from the run
seed, the prompt index and the depth index, as the request seeds are: a rerun, another worker
or another machine draws the same operator for the same step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

# In this order the weights are laid out on [0, 1) for the draw, whatever order a config
# lists them in: two configs with the same weights (and so the same fingerprint, whose JSON
# sorts its keys) draw the same operators.
OPERATORS: tuple[str, ...] = (
    "constraints",
    "deepen",
    "concretize",
    "reasoning",
    "complicate_input",
)
# The template each operator's request is made from: `constraints` is the depth step as it
# always was, so its template keeps the name `depth`.
TEMPLATES: dict[str, str] = {
    "constraints": "depth",
    "deepen": "deepen",
    "concretize": "concretize",
    "reasoning": "reasoning",
    "complicate_input": "complicate_input",
}
DEFAULT_WEIGHTS: dict[str, float] = {"constraints": 1.0}
_SCALE = 2.0**64
# Weights are relative; this bound keeps the sum of five of them finite.
MAX_WEIGHT = 1e12


def checked_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """The weights in operator order without the zeros (0 means never, as left out does),
    or ValueError naming the first problem: an unknown name, a negative weight, or no
    weight above zero (no operator could ever be drawn)."""
    for name, weight in weights.items():
        if name not in TEMPLATES:
            raise ValueError(f"unknown operator {name!r} (the operators: {', '.join(OPERATORS)})")
        if weight < 0:
            raise ValueError(f"{name}: weight {weight} is negative (0 means never)")
        if weight > MAX_WEIGHT:  # their sum must stay a finite number for the draw
            raise ValueError(f"{name}: weight {weight} is above {MAX_WEIGHT:g}")
    kept = {name: float(weights[name]) for name in OPERATORS if weights.get(name, 0) > 0}
    if not kept:
        raise ValueError("every weight is 0: give at least one operator a weight above 0")
    if list(kept) == ["constraints"]:  # any weight of the one operator draws it every time
        return dict(DEFAULT_WEIGHTS)
    return kept


def draw_point(run_seed: int, index: int, depth: int) -> float:
    """A number in [0, 1) for one depth step of one prompt, stable across reruns and
    machines, derived as `pipeline.request_seed` derives the request seeds (a key of its own,
    so the draw and the depth request's sampling are independent)."""
    key = f"{run_seed}/{index}/operator/{depth}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / _SCALE


def pick(weights: Mapping[str, float], point: float) -> str:
    """The operator whose share of [0, 1) holds `point`, shares in proportion to the weights
    and laid out in `OPERATORS` order."""
    names = [name for name in OPERATORS if weights.get(name, 0) > 0]
    mark = point * sum(weights[name] for name in names)
    reached = 0.0
    for name in names:
        reached += weights[name]
        if mark < reached:
            return name
    return names[-1]  # `mark` rounded up to the total


def draw(weights: Mapping[str, float], run_seed: int, index: int, depth: int) -> str:
    """The operator of depth step `depth` of prompt `index` in a run seeded `run_seed`."""
    return pick(weights, draw_point(run_seed, index, depth))
