"""VQA answer normalisation, as the official VQA evaluation (GT-Vision-Lab/VQA, `vqaEval.py`) does it.

Two steps, applied in this order to an answer that is already stripped (newlines and tabs → spaces):

1. `strip_punctuation`: each character of `PUNCTUATION` is deleted when it touches a space somewhere in the
   answer (`"yes !"`), or when the answer contains a digit-comma-digit run (`"1,000"` → `"1000"`); otherwise it
   becomes a space (`"red/white"` → `"red white"`). Then every period not followed by a digit is deleted, so
   decimals survive (`"2.5."` → `"2.5"`). Apostrophes, colons and `#`, `$`, `%`, `&`, `*` are not punctuation here.
2. `normalize_words`: lower-case, split on whitespace, number words → digits (`NUMBER_WORDS`, "none" → "0"),
   drop the articles a / an / the, then map contractions written without apostrophe (`CONTRACTIONS`,
   "isnt" → "isn't") and join with single spaces.

`normalize_answer` applies both. When the official script applies them is a separate question, answered in
`vlmo.finetune.evaluate.vqa_accuracy`. The tables are the official ones, entries and oddities included: the keys
with capitals ("Im", "Ive") can never match lower-cased words, and "somebody'd" maps to "somebodyd".
"""

from __future__ import annotations

import re

# Each character is handled on its own (so their order does not matter). Listed as in the official script.
PUNCTUATION: str = ';/[]"{}()=+\\_-><@`,?!'
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
CONTRACTIONS: dict[str, str] = {
    "'ow'sat": "'ow's'at",
    "'ows'at": "'ow's'at",
    "I'dve": "I'd've",
    "Id've": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldn'tve": "couldn't've",
    "couldnt": "couldn't",
    "couldnt've": "couldn't've",
    "couldve": "could've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadn'tve": "hadn't've",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "he'dve": "he'd've",
    "hed": "he'd",
    "hed've": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "it'dve": "it'd've",
    "itd": "it'd",
    "itd've": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightn'tve": "mightn't've",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "shant": "shan't",
    "she'dve": "she'd've",
    "she's": "she's",
    "shed've": "she'd've",
    "shouldn'tve": "shouldn't've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldve": "should've",
    "somebody'd": "somebodyd",
    "somebody'dve": "somebody'd've",
    "somebodyd've": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someone'dve": "someone'd've",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "something'dve": "something'd've",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "there'dve": "there'd've",
    "thered": "there'd",
    "thered've": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "they'dve": "they'd've",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "we'dve": "we'd've",
    "wed've": "we'd've",
    "werent": "weren't",
    "weve": "we've",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "who'dve": "who'd've",
    "whod": "who'd",
    "whod've": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldn'tve": "wouldn't've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldve": "would've",
    "y'all'dve": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'allll": "y'all'll",
    "yall": "y'all",
    "yall'd've": "y'all'd've",
    "yall'll": "y'all'll",
    "you'dve": "you'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# A digit, a comma, a digit anywhere in the answer switches punctuation to deletion (official `commaStrip`).
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit. The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a lookahead
# for the literal text "<=" plus a digit, which can never match where a "." stands, so only "(?!\d)" matters.
_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) where `Pattern.sub` takes `count`, so at most 32 periods go.
_MAX_PERIODS = 32


def clean_whitespace(text: str) -> str:
    """Newlines and tabs → spaces, then strip (done to every answer, whatever the mode)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def strip_punctuation(text: str) -> str:
    """Delete or space out `PUNCTUATION` and drop periods that end a word; see the module docstring."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The test looks at the original text, the replacement at the text so far (as the official loop does).
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def normalize_words(text: str) -> str:
    """Lower-case; number words → digits; drop articles; restore apostrophes of contractions; single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The full official normalisation: `clean_whitespace`, `strip_punctuation`, `normalize_words`.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("isnt it, the 1,000?")
    "isn't it 1000"
    """
    return normalize_words(strip_punctuation(clean_whitespace(text)))
