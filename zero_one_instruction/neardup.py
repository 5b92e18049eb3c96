"""Near-duplicate questions: MinHash signatures over character n-grams, as LSH band keys.

Built on `datasketch` (MinHash, and MinHashLSH's choice of bands and rows for a threshold): a
maintained library, fast enough with its batched update, and the same estimator NeMo Curator
and text-dedup use, so a threshold here means what it means there. Two texts are near
duplicates when they agree on all rows of at least one band, as in MinHashLSH; each band is
kept as one 64-bit integer (a hash of its rows and its number), so an index is one dict of
ints, or numbers spilled to disk by the report (`dupcount`), instead of datasketch's dict of
byte strings to sets per band. Two different bands share a key with a chance of 2**-64.

`NearDuplicates` is the merge's online index: fed questions in order, it says for each the
earliest kept question it nearly repeats (keeping the lowest index). A band in common only
makes two questions candidates (at 0.7, a pair at Jaccard 0.54 shares a band about one time
in twenty): the index keeps each kept question's signature too and drops a question only for
a candidate whose estimated Jaccard similarity reaches the threshold. That is 14 keys and 128
values per kept question at the default threshold (about 1.6 KB with Python's overhead; see
docs/benchmarks.md). The report (`dupcount`) checks its candidates with the same `Bands` and
the same `similarity`, from signatures spilled to disk, so the two mean the same threshold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
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
        return self.band_keys(self.signature(text).hashvalues)

    def band_keys(self, values: np.ndarray) -> list[int]:
        """`keys` from a signature already made, for a caller that also needs its values."""
        bands, rows = self._layout
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


def similarity(one: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The estimated Jaccard similarity of two signatures, or of each row of two stacks of
    them: the share of equal MinHash values, as datasketch's `MinHash.jaccard` computes it.
    One definition for the merge and the report, so a pair is near in both or in neither."""
    return np.count_nonzero(one == other, axis=-1) / one.shape[-1]


Owners = int | list[int]
"""The kept questions holding a band key: almost always one, so a bare int saves a list."""


@dataclass
class NearDuplicates:
    """The merge's index of kept questions: `add_unique` returns the key of the earliest
    indexed question sharing a band with `text` whose estimated Jaccard similarity to it is at
    least `threshold` (LSH still misses a few pairs near it), or None, and then indexes
    `text`."""

    threshold: float = THRESHOLD
    bands: Bands = field(init=False, repr=False)
    # Band key -> the kept questions holding it. Several when a question shared a band with a
    # kept one but was not similar enough to be dropped.
    _owners: dict[int, Owners] = field(default_factory=dict, init=False, repr=False)
    # Kept question -> its MinHash values as uint32 bytes (512 at 128 permutations): the
    # smallest object numpy can compare against without a copy.
    _signatures: dict[int, bytes] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.bands = Bands(threshold=self.threshold)

    def add_unique(self, key: int, text: str) -> int | None:
        """The earliest key `text` nearly repeats, or None and `text` indexed under `key`.
        For dedup: a dropped text is not indexed, so a later text is dropped only for nearly
        repeating one that is kept (no chains of texts each a little further off). Keys must
        grow: the earliest is the smallest."""
        values = self.bands.signature(text).hashvalues
        band_keys = self.bands.band_keys(values)
        for candidate in self._candidates(band_keys):
            if self._similarity(candidate, values) >= self.threshold:
                return candidate
        self._index(key, band_keys, values)
        return None

    def _candidates(self, band_keys: list[int]) -> list[int]:
        """The kept questions sharing a band with these keys, earliest first."""
        found: set[int] = set()
        for band_key in band_keys:
            owners = self._owners.get(band_key)
            if isinstance(owners, int):
                found.add(owners)
            elif owners is not None:
                found.update(owners)
        return sorted(found)

    def _similarity(self, candidate: int, values: np.ndarray) -> float:
        kept = np.frombuffer(self._signatures[candidate], dtype=np.uint32)
        return float(similarity(kept, values))

    def _index(self, key: int, band_keys: list[int], values: np.ndarray) -> None:
        # datasketch's values are below 2**32, in uint64 before its version 2.
        self._signatures[key] = values.astype(np.uint32).tobytes()
        owners = self._owners
        for band_key in band_keys:
            held = owners.get(band_key)
            if held is None:
                owners[band_key] = key
            elif isinstance(held, int):
                owners[band_key] = [held, key]
            else:
                held.append(key)

    def forget(self, keys: Iterable[int]) -> None:
        """Take texts back out of the index (the records of a merged shard that failed its
        checksum), so that nothing later is dropped for repeating them. Rare, so a scan of
        the index rather than a second map kept for every text."""
        gone = set(keys)
        if not gone:
            return
        for key in gone:
            self._signatures.pop(key, None)
        owners = self._owners
        # Only the changed entries are listed: a copy of the whole index would double it.
        changed = [
            (band_key, left)
            for band_key, held in owners.items()
            if (left := _without(held, gone)) is not held
        ]
        for band_key, left in changed:
            if left is None:
                del owners[band_key]
            else:
                owners[band_key] = left


def _without(owners: Owners, gone: set[int]) -> Owners | None:
    """`owners` less those `gone`: None when none is left, `owners` itself when none went."""
    if isinstance(owners, int):
        return None if owners in gone else owners
    left = [owner for owner in owners if owner not in gone]
    if len(left) == len(owners):
        return owners
    if not left:
        return None
    return left[0] if len(left) == 1 else left
