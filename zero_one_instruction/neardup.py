"""Near-duplicate questions: MinHash signatures over character n-grams, as LSH band keys.

Built on `datasketch` (MinHash, and MinHashLSH's choice of bands and rows for a threshold): a
maintained library, fast enough with its batched update, and the same estimator NeMo Curator
and text-dedup use, so a threshold here means what it means there. Two texts are near
duplicates when they agree on all rows of at least one band, as in MinHashLSH; each band is
kept as one 64-bit integer (a hash of its rows and its number), so an index is one dict of
ints, or numbers spilled to disk by the report (`dupcount`), instead of datasketch's dict of
byte strings to sets per band. Two different bands share a key with a chance of 2**-64.

`NearDuplicates` is the merge's online index: fed questions in order, it says for each the
earliest kept question it nearly repeats (keeping the lowest index). It holds 14 keys per
kept question at the default threshold (about 1 KB with Python's dict overhead; see
docs/benchmarks.md). The report counts with the same `Bands`, so the two agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from datasketch import MinHash, MinHashLSH

from .detectors import NEAR_THRESHOLD, char_ngrams, normalized

# Japanese has no spaces, so shingles are character n-grams. Two characters are the size of
# a typical kanji word, and shared by unrelated questions through particles and endings
# (「して」「です」); five or more make a short question fragile: one changed character
# removes five shingles of perhaps sixty. Three keeps ordinary phrasing from looking alike
# and a rewording of a word or two still close: an 80-character question with three
# characters changed keeps a Jaccard similarity of about 0.8.
SHINGLE = 3
NUM_PERM = 128
THRESHOLD = NEAR_THRESHOLD
SEED = 1


def shingles(text: str, n: int = SHINGLE) -> set[bytes]:
    """The text's character n-grams, after NFKC and with whitespace removed (a line break
    or a full-width space does not make a question new)."""
    compact = "".join(normalized(text).split())
    return {gram.encode("utf-8") for gram in char_ngrams(compact, n)}


@dataclass(frozen=True)
class Bands:
    """How a text becomes its LSH band keys: the MinHash parameters and MinHashLSH's bands
    and rows for `threshold` (14 bands of 9 rows at 0.7 with 128 permutations)."""

    threshold: float = THRESHOLD
    num_perm: int = NUM_PERM
    shingle: int = SHINGLE
    _template: MinHash = field(init=False, repr=False, compare=False)
    _layout: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        object.__setattr__(self, "_layout", (lsh.b, lsh.r))
        # The permutations are drawn once: drawing them for every text costs as much as
        # hashing the text.
        object.__setattr__(self, "_template", MinHash(num_perm=self.num_perm, seed=SEED))

    @property
    def count(self) -> int:
        """Keys per text."""
        return self._layout[0]

    def signature(self, text: str) -> MinHash:
        template = self._template
        minhash = MinHash(
            num_perm=self.num_perm,
            seed=SEED,
            permutations=template.permutations,
            scheme=template.scheme,
        )
        minhash.update_batch(shingles(text, self.shingle))
        return minhash

    def keys(self, text: str) -> list[int]:
        """One 64-bit key per band: equal for two texts exactly when that band's rows are."""
        bands, rows = self._layout
        values = self.signature(text).hashvalues
        data, width = values.tobytes(), rows * values.itemsize
        return [
            int.from_bytes(
                hashlib.blake2b(
                    data[band * width : (band + 1) * width],
                    digest_size=8,
                    salt=band.to_bytes(16, "little"),
                ).digest(),
                "little",
            )
            for band in range(bands)
        ]


@dataclass
class NearDuplicates:
    """The merge's index of kept questions: `add_unique` returns the key of the earliest
    indexed question sharing a band with `text` (its estimated Jaccard similarity is probably
    at or above `threshold`: LSH has a few false negatives and positives near it), or None,
    and then indexes `text`."""

    threshold: float = THRESHOLD
    bands: Bands = field(init=False, repr=False)
    # A question is indexed only if none of its bands is, so each band key has one owner.
    _owner: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.bands = Bands(threshold=self.threshold)

    def add_unique(self, key: int, text: str) -> int | None:
        """The earliest key `text` nearly repeats, or None and `text` indexed under `key`.
        For dedup: a dropped text is not indexed, so a later text is dropped only for nearly
        repeating one that is kept (no chains of texts each a little further off). Keys must
        grow: the earliest is the smallest."""
        band_keys = self.bands.keys(text)
        owner = self._owner
        found = [owner[k] for k in band_keys if k in owner]
        if found:
            return min(found)
        for band_key in band_keys:
            owner[band_key] = key
        return None

    def forget(self, keys: Iterable[int]) -> None:
        """Take texts back out of the index (the records of a merged shard that failed its
        checksum), so that nothing later is dropped for repeating them. Rare, so a scan of
        the index rather than a second map kept for every text."""
        gone = set(keys)
        if not gone:
            return
        for band_key in [k for k, owner in self._owner.items() if owner in gone]:
            del self._owner[band_key]
