"""Small pure checks on one question or answer: script share, scaffolding leaks, loops,
restated questions, refusals in other words than the marker.

`zoi report` counts what they find, and the pipeline's filters (`language`, `leakage`,
`repetition`) are meant to call the same functions, so that a figure in the report and a drop
reason in the funnel always mean the same thing. Each check takes text and returns a finding or
`None`; none of them keeps state, so they can run in any worker.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .templates import JUDGE_REPLIES, SPEAKERS

if TYPE_CHECKING:
    from .templates import Templates

JUDGE_NO = JUDGE_REPLIES[1]  # the judge's reply that marks an example as a text to avoid
# The scripts counted, in the order the report shows them.
SCRIPTS = ("hiragana", "katakana", "kanji", "latin", "hangul", "other")
JAPANESE_SCRIPTS = ("hiragana", "katakana", "kanji")
# Below this share of Japanese letters, a text is "mostly another language".
MIN_JAPANESE_SHARE = 0.5
# Chinese is all kanji: a text of this many letters or more whose kana are below the share
# under it is Chinese, however high its "Japanese" share.
CHINESE_MIN_LETTERS = 20
CHINESE_MAX_KANA_SHARE = 0.05
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)
_COLON_LABEL = re.compile(r"「([^「」\n]{1,20}[:：])」")
_LINE_LABEL = re.compile(r"^\s*([^\s{}:：]{1,20}[:：])\s*$", re.MULTILINE)
_HEADING = re.compile(r"^\s*([^\s{}:：]{1,20}[:：])", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{[A-Za-z_]\w*\}")
# A user template's line without a placeholder is a request a model may copy ("この文章を質問文
# として仕上げてください。"), but only at this length is it one: a shorter line ("質問", "例") is
# a word any question may hold. A short label has its colon, and is found as a label.
MIN_REQUEST_CHARS = 8
# A phrase of 8 to 200 characters said three times in a row: "はいはいはい" is too short to
# count, a sentence caught in a loop is not.
PHRASE_MIN, PHRASE_MAX = 8, 200
_SENTENCE_END = re.compile(r"(?<=[。！？!?])|\n")
MIN_REPEATED_UNIT = 10
LOOP_REPEATS = 3
RESTATE_SHARE = 0.6
# Two questions whose character trigrams have an estimated Jaccard similarity of at least this
# are near-duplicates (`neardup`); here, so the merge's options know it without datasketch.
NEAR_THRESHOLD = 0.7
RESTATE_MIN_CHARS = 10
# A later turn's text repeats earlier text of its conversation when at least this share of its
# character trigrams are in one earlier question or answer: it adds almost nothing of its own.
# A real follow-up names what came before (「その糸の太さは」) but asks something new with it.
REPEAT_SHARE = 0.7
# A refusal says so at once and says little else: its phrase must start in the answer's first
# REFUSAL_OPENING characters, and the answer must be at most REFUSAL_MAX_CHARS long.
REFUSAL_OPENING = 120
REFUSAL_MAX_CHARS = 400
# Ways a model declines without the marker: they say the speaker cannot or will not answer or
# help, that the question lacks what an answer needs, or apologise in the way English and
# Chinese chat models open a refusal. "できません" alone is not here: 「再冷凍はできません」
# is an answer.
_REFUSAL = re.compile(
    r"(?:お|ご)?(?:答え|回答|返答|応え|返事|手伝い|協力|対応)(?:すること)?(?:が|は)?"
    r"(?:できません|いたしかねます|できかねます)"
    r"|(?:お答え|回答|返答)を(?:控え|差し控え)|答えられません"
    r"|(?:情報|前提|文脈)が(?:不足|足りな|ありません|ないため)"
    r"|(?:質問|ご質問|依頼)の(?:意味|意図|内容)が(?:分|わ)かりません"
    r"|\bI(?:'m| am) (?:sorry|unable)|\bI (?:cannot|can't|can not|won't)|\bas an AI\b"
    r"|抱歉|无法回答|无法提供",
    re.IGNORECASE,
)


# Words that carry no content on their own: an answer made only of these (and punctuation)
# answers nothing. Matched after NFKC and casefold.
_FILLER = re.compile(
    r"はい|いいえ|ええ|えー*と|え+[ー～]*|あの+[ー～]*|う+ー*ん|ふむ|なるほど|そうですね"
    r"|(?:了解|承知|かしこまり)(?:しました|いたしました|です)?|(?:わ|分)かりました"
    r"|\b(?:ok(?:ay)?|yes|no|sure|hmm+|um+|uh+|well|n/?a)\b"
)


def normalized(text: str) -> str:
    """NFKC, so full-width and half-width forms (`：` and `:`, `Ａ` and `A`) compare equal:
    models write both, and a label or a duplicate must not hide behind the other form."""
    return unicodedata.normalize("NFKC", text)


def char_ngrams(text: str, n: int) -> Iterator[str]:
    """The overlapping character n-grams of `text`, or the text itself when it is shorter:
    a two-character question still has one shingle, so it can still be compared."""
    if len(text) <= n:
        if text:
            yield text
        return
    for i in range(len(text) - n + 1):
        yield text[i : i + n]


def without_code(text: str) -> str:
    """`text` without fenced or inline code: code is written in Latin letters in a Japanese
    answer too, and must count neither as another language nor as a loop."""
    return _CODE.sub(" ", text)


def script_of(char: str) -> str | None:
    """The script a character is written in, or None for digits, punctuation, spaces and
    symbols, which belong to no language."""
    code = ord(char)
    if 0x3041 <= code <= 0x309F:
        return "hiragana"
    if 0x30A1 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9D:
        return "katakana" if code != 0x30FB else None  # ・ is punctuation
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or code in (0x3005, 0x3006):
        return "kanji"  # 々 and 〆 are written as kanji
    if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "hangul"
    if not char.isalpha():
        return None
    return "latin" if char.isascii() or "LATIN" in unicodedata.name(char, "") else "other"


@dataclass(frozen=True)
class ScriptShare:
    """How many letters of a text are in each script (code left out)."""

    counts: dict[str, int]

    @property
    def letters(self) -> int:
        return sum(self.counts.values())

    def share(self, *scripts: str) -> float:
        """The share of the letters in `scripts`; a text without letters is not another
        language, so it counts as all Japanese."""
        if not self.letters:
            return 1.0 if set(scripts) & set(JAPANESE_SCRIPTS) else 0.0
        return sum(self.counts.get(s, 0) for s in scripts) / self.letters

    @property
    def japanese(self) -> float:
        return self.share(*JAPANESE_SCRIPTS)


def script_share(text: str) -> ScriptShare:
    """The letters of `text` by script, fenced and inline code left out."""
    counts: Counter[str] = Counter()
    for char in without_code(text):
        script = script_of(char)
        if script is not None:
            counts[script] += 1
    return ScriptShare({script: counts[script] for script in SCRIPTS})


def other_language(text: str, min_share: float = MIN_JAPANESE_SHARE) -> str | None:
    """Why `text` is mostly not Japanese ("chinese", "latin", ...), or None if it is Japanese.

    Kanji alone do not make Japanese: Chinese is written in them too. Japanese prose is a third
    or more kana, so a long text with almost none is taken for Chinese."""
    share = script_share(text)
    kana = share.share("hiragana", "katakana")
    chinese = share.letters >= CHINESE_MIN_LETTERS and kana < CHINESE_MAX_KANA_SHARE
    if chinese and share.share("kanji") >= min_share:
        return "chinese"
    if share.japanese >= min_share:
        return None
    others = {s: share.counts[s] for s in SCRIPTS if s not in JAPANESE_SCRIPTS}
    return max(others, key=lambda s: others[s])


def _labels_in(text: str) -> Iterator[str]:
    """A template's labels: 「テーマ:」 quoted in its instructions, and the lines that only
    name the material that follows ("手本の依頼文:")."""
    for pattern in (_COLON_LABEL, _LINE_LABEL):
        for match in pattern.finditer(text):
            yield normalized(match.group(1))


def _bad_examples(templates: Templates) -> Iterator[str]:
    """The texts the templates show as wrong: the judge's examples answered いいえ and every
    text the fixer is shown to repair. Their headings ("タスク:") are scaffolding too."""
    for example in templates.judge.examples:
        if example.reply != JUDGE_NO:
            continue
        yield from (value for _, value in example.values)
    for example in templates.fix.examples:
        yield from (value for _, value in example.values)


def scaffolding(templates: Templates, optional: Iterable[str] = ()) -> tuple[str, ...]:
    """What of the templates must never reach a question: their labels and headings, the
    headings of the texts they show as wrong, and the one-line requests of the user messages
    of `MIN_REQUEST_CHARS` or more (a model that copies its instructions copies these).
    Taken from the templates in use, so a user's own templates are checked for their own
    scaffolding, not the shipped ones': the original ones, and of the depth operators', the
    no-gain judge's and the follow-up's the `optional` ones a run sends (one that is never
    sent cannot be copied, and its labels would change what a run that sends none of them
    drops)."""
    found: dict[str, None] = {}
    steps = ("width", "judge", "fix", "depth", "flatten", *optional)
    for name in steps:
        step = templates.step(name)
        for text in (step.system or "", step.user):
            found.update(dict.fromkeys(_labels_in(text)))
        for line in step.user.splitlines():
            line = normalized(line.strip())
            if len(line) >= MIN_REQUEST_CHARS and not _PLACEHOLDER.search(line):
                found[line] = None
    for text in _bad_examples(templates):
        found.update(dict.fromkeys(normalized(m.group(1)) for m in _HEADING.finditer(text)))
    if "follow_up" in steps:  # the speakers' labels `{conversation}` is written with
        found.update(dict.fromkeys(normalized(label.strip()) for label in SPEAKERS))
    return tuple(found)


def leaked(question: str, labels: Iterable[str]) -> str | None:
    """The first piece of template scaffolding found in `question`, or None."""
    text = normalized(question)
    return next((label for label in labels if label in text), None)


def filler(answer: str) -> bool:
    """Whether an answer says nothing: once filler words (はい, えーと, 了解しました, OK...)
    are taken out, no letter or digit is left, only punctuation, symbols and spaces. Any word
    of content ("東京です", "42") makes it an answer, however short."""
    text = _FILLER.sub("", normalized(answer).casefold())
    return not any(char.isalnum() for char in text)


def _repeated_unit(units: Iterable[str]) -> str | None:
    """A unit (line or sentence) of some length that comes back `LOOP_REPEATS` times."""
    counts: Counter[str] = Counter()
    for unit in units:
        unit = unit.strip()
        if len(unit) < MIN_REPEATED_UNIT or not any(ch.isalnum() for ch in unit):
            continue
        counts[unit] += 1
        if counts[unit] >= LOOP_REPEATS:
            return unit
    return None


def _said_thrice(text: str, start: int, length: int) -> bool:
    """Whether the phrase of `length` characters at `start` follows itself twice more."""
    if start + 3 * length > len(text):
        return False
    unit = text[start : start + length]
    return text.startswith(unit, start + length) and text.startswith(unit, start + 2 * length)


def _phrase_loop(text: str) -> str | None:
    """The phrase a regex `(.{8,200}?)\\1{2,}` would find (the leftmost start, then the
    shortest phrase), found in time about linear in the text instead: that regex tries every
    length at every position and took seconds on a long answer, on the event loop where the
    filters run. A phrase said three times starts with the same `PHRASE_MIN` characters one
    phrase further on, so only such pairs of positions are checked, and in natural text they
    are few."""
    following = _next_same(text, PHRASE_MIN)
    for start in range(len(text) - 3 * PHRASE_MIN + 1):
        later = following[start]
        while later >= 0 and later - start <= PHRASE_MAX:
            if later - start >= PHRASE_MIN and _said_thrice(text, start, later - start):
                return text[start:later]
            later = following[later]
    return None


def _next_same(text: str, width: int) -> list[int]:
    """For each position, the next one where the same `width` characters start, or -1."""
    following = [-1] * len(text)
    last: dict[str, int] = {}
    for position in range(len(text) - width, -1, -1):
        gram = text[position : position + width]
        following[position] = last.get(gram, -1)
        last[gram] = position
    return following


def looping(answer: str) -> str | None:
    """What an answer repeats in a loop, or None: a line or a sentence that comes back three
    times, or a phrase said three times in a row. Code is left out: code repeats lines by
    nature. These are the loops a small model falls into when it cannot stop."""
    text = without_code(answer)
    found = _repeated_unit(text.splitlines()) or _repeated_unit(_SENTENCE_END.split(text))
    if found:
        return found
    phrase = _phrase_loop(text)
    return phrase if phrase is not None and phrase.strip() else None


def _compact(text: str) -> str:
    return "".join(normalized(text).split())


def restates(question: str, answer: str, n: int = 3) -> bool:
    """Whether the answer opens by repeating the question, which the answer template asks the
    model not to do: the question is in the answer word for word, or most of the question's
    character trigrams are in the answer's opening (a little longer than the question, as a
    restatement often adds a word or two)."""
    q, a = _compact(question), _compact(answer)
    if len(q) < RESTATE_MIN_CHARS:
        return False
    if q in a:
        return True
    q_grams = set(char_ngrams(q, n))
    opening = set(char_ngrams(a[: len(q) + len(q) // 4], n))
    return len(q_grams & opening) / len(q_grams) >= RESTATE_SHARE


def repeats(text: str, earlier: Iterable[str], n: int = 3) -> bool:
    """Whether a later turn's text says again what an earlier text of its conversation said:
    most of its character trigrams are in one of them (a word-for-word copy has all). Asked
    for the user's next question, a small model often copies the first question or a sentence
    of the answer; asked for the next answer, the first answer."""
    t = _compact(text)
    if len(t) < RESTATE_MIN_CHARS:
        return False
    grams = set(char_ngrams(t, n))
    return any(
        len(grams & set(char_ngrams(other, n))) / len(grams) >= REPEAT_SHARE
        for other in map(_compact, earlier)
    )


def refusal(answer: str, marker: str) -> str | None:
    """What makes a kept answer look like a refusal that the marker check let through, or None.

    The pipeline drops an answer that holds the refusal marker word for word; a model that
    declines in its own words ("お答えできません", "I'm sorry") or writes the marker in another
    form (other width or case, spaces inside) is kept. Such an answer is flagged when a refusal
    phrase starts in its opening and the answer is short, or when it holds the marker once
    widths, case and spaces are evened out ("marker"). A long answer that opens with a hedge
    and then answers is an answer, so length rules it out."""
    if marker and _compact(marker).casefold() in _compact(answer).casefold():
        return "marker"
    text = normalized(answer).strip()
    if len(text) > REFUSAL_MAX_CHARS:
        return None
    match = _REFUSAL.search(text)
    if match is None or match.start() >= REFUSAL_OPENING:
        return None
    return match.group(0)
