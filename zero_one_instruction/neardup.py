"""Near-duplicate questions: MinHash signatures over character n-grams, found with LSH.

Built on `datasketch` (MinHash and MinHashLSH): a maintained library, fast enough with its
batched update, and the same estimator NeMo Curator and text-dedup use, so a threshold here
means what it means there. One `NearDuplicates` is fed texts in order and says, for each, the
earliest text it nearly repeats: that is what `zoi report` counts and what a near-dedup merge
drops (keeping the lowest index).

Memory grows with the texts indexed (LSH keeps each text's band hashes, about 1 KB a text at
the defaults); everything else in the report is flat.
"""

from __future__ import annotations

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


@dataclass
class NearDuplicates:
    """An LSH index fed in order. `add` returns the key of the earliest indexed text whose
    estimated Jaccard similarity is at or above `threshold` (probably: LSH has a few false
    negatives and false positives near the threshold), or None, and indexes the text."""

    threshold: float = THRESHOLD
    num_perm: int = NUM_PERM
    shingle: int = SHINGLE
    _lsh: MinHashLSH = field(init=False, repr=False)
    _template: MinHash = field(init=False, repr=False)
    _root: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        # The permutations are drawn once: drawing them for every text costs as much as
        # hashing the text.
        self._template = MinHash(num_perm=self.num_perm, seed=SEED)

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

    def add(self, key: int, text: str) -> int | None:
        """The earliest key `text` nearly repeats (followed to the first of its cluster), or
        None. Keys must grow: the earliest is the smallest."""
        minhash = self.signature(text)
        found = self._lsh.query(minhash)
        self._lsh.insert(key, minhash, check_duplication=False)
        if not found:
            return None
        root = min(self._root.get(k, k) for k in found)
        self._root[key] = root
        return root

    def add_unique(self, key: int, text: str) -> int | None:
        """The earliest key `text` nearly repeats, or None and `text` indexed under `key`.
        For dedup: a dropped text is not indexed, so a later text is dropped only for nearly
        repeating one that is kept (no chains of texts each a little further off)."""
        minhash = self.signature(text)
        found = self._lsh.query(minhash)
        if found:
            return min(found)
        self._lsh.insert(key, minhash, check_duplication=False)
        return None

    def forget(self, keys: Iterable[int]) -> None:
        """Take texts back out of the index (the records of a merged shard that failed its
        checksum), so that nothing later is dropped for repeating them."""
        for key in keys:
            self._lsh.remove(key)
            self._root.pop(key, None)

    def root(self, key: int) -> int:
        """The first text of the cluster `key` belongs to (itself if it repeats nothing)."""
        return self._root.get(key, key)
