"""The merge's near-dedup index drops a question only for a kept one at or above the
threshold: a band in common makes a candidate, its estimated Jaccard similarity decides."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from zero_one_instruction.neardup import THRESHOLD, Bands, NearDuplicates

BANDS = Bands()
BASE = "日本の四季それぞれの特徴と、季節ごとの代表的な行事について詳しく説明してください。"


def _similarity(one: str, other: str) -> float:
    return float(BANDS.signature(one).jaccard(BANDS.signature(other)))


def _share_a_band(one: str, other: str) -> bool:
    return bool(set(BANDS.keys(one)) & set(BANDS.keys(other)))


def _rewordings(seed: int) -> Iterator[str]:
    """BASE with three to six characters replaced by random hiragana, endlessly."""
    rng = random.Random(seed)
    while True:
        chars = list(BASE)
        for _ in range(rng.randint(3, 6)):
            chars[rng.randrange(len(chars))] = chr(rng.randint(0x3041, 0x3093))
        yield "".join(chars)


def _first(wanted: Callable[[float], bool]) -> str:
    """The first rewording sharing a band with BASE whose similarity to it is `wanted`: LSH
    makes these pairs candidates whatever their similarity, so both kinds are common."""
    for text in _rewordings(seed=0):
        if _share_a_band(BASE, text) and wanted(_similarity(BASE, text)):
            return text
    raise AssertionError("unreachable: the rewordings are endless")


BELOW = _first(lambda similarity: similarity < THRESHOLD)
ABOVE = _first(lambda similarity: similarity >= THRESHOLD)


def test_a_question_sharing_a_band_below_the_threshold_is_kept() -> None:
    index = NearDuplicates()
    assert index.add_unique(0, BASE) is None
    assert index.add_unique(1, BELOW) is None


def test_a_question_at_or_above_the_threshold_is_dropped() -> None:
    index = NearDuplicates()
    assert index.add_unique(0, BASE) is None
    assert index.add_unique(1, ABOVE) == 0
    assert index.add_unique(2, BASE) == 0


def test_the_earliest_candidate_similar_enough_is_named() -> None:
    """BELOW shares a band with BASE and with itself: the earlier candidate fails the
    threshold, so its repeat is dropped for the later one."""
    index = NearDuplicates()
    assert index.add_unique(0, BASE) is None
    assert index.add_unique(1, BELOW) is None
    assert index.add_unique(2, BELOW) == 1


def test_forget_drops_the_signatures_and_the_shared_band_keys() -> None:
    index = NearDuplicates()
    index.add_unique(0, BASE)
    index.add_unique(1, BELOW)
    index.forget([1])
    assert index.add_unique(2, BELOW) is None  # not a repeat of the forgotten one any more
    assert index.add_unique(3, ABOVE) == 0
    index.forget([0, 2])
    assert (index._owners, index._signatures) == ({}, {})
    assert index.add_unique(4, ABOVE) is None
