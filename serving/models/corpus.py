"""A deterministic training corpus for the built-in model's BPE tokenizer.

English-like sentences (a common-word list plus generated rarer pseudo-words, Zipf-like frequencies),
Python- and JSON-like snippets, numbers, dates and arithmetic, and the Zen of Python. Everything comes
from `random.Random(seed)` and fixed lists, never from set or dict iteration order, so the text (and
the tokenizer trained on it) is identical on every run and machine.
"""
from __future__ import annotations

import ast
import codecs
import importlib.util
import itertools
import random

COMMON_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this from or had
by hot word but what some we can out other were all there when up use your how said an each she which
do their time if will way about many then them write would like so these her long make thing see him
two has look more day could go come did number sound no most people my over know water than call first
who may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among server request token model memory cache batch queue latency user
assistant system hello please thanks
""".split()

_ONSETS = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl pr sh st th tr ch qu sp".split()
_VOWELS = "a e i o u ai ea ou ie oo".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "x"]
_PUNCT = [".", ".", ".", "?", "!"]


def build_corpus(num_lines: int, num_rare_words: int, seed: int = 0) -> list[str]:
    """About `num_lines` lines of mixed text (~50 characters each), grouped into short documents so
    newlines and blank lines are learned too, plus the Zen of Python."""
    rng = random.Random(seed)
    words = _WordSampler(rng, _pseudo_words(rng, num_rare_words))
    makers = [_sentence] * 6 + [_code_line] * 2 + [_numbers_line]
    documents, num_done = [], 0
    while num_done < num_lines:
        lines = [rng.choice(makers)(rng, words) for _ in range(rng.randint(1, 6))]
        documents.append(rng.choice(["\n", "\n", "\n\n", " "]).join(lines))
        num_done += len(lines)
    return documents + [zen_of_python()]


class _WordSampler:
    """Zipf-like word frequencies (weight 1/rank): common words mostly, rare pseudo-words now and then."""

    def __init__(self, rng: random.Random, rare_words: list[str]):
        self.rng, self.rare_words = rng, rare_words
        self.common_weights = list(itertools.accumulate(1 / r for r in range(1, len(COMMON_WORDS) + 1)))
        self.rare_weights = list(itertools.accumulate(1 / r for r in range(1, len(rare_words) + 1)))

    def __call__(self) -> str:
        if self.rare_words and self.rng.random() < 0.2:
            return self.rng.choices(self.rare_words, cum_weights=self.rare_weights)[0]
        return self.rng.choices(COMMON_WORDS, cum_weights=self.common_weights)[0]


def zen_of_python() -> str:
    """The text of `import this`, read from the module source (importing it would print it)."""
    spec = importlib.util.find_spec("this")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "s":
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    raise RuntimeError("the `this` module has no text")


def _pseudo_words(rng: random.Random, num_words: int) -> list[str]:
    """Distinct pronounceable words of 1-4 syllables, in generation order (no set iteration)."""
    words, seen = [], set()
    while len(words) < num_words:
        num_syllables = rng.choice([1, 2, 2, 2, 3, 3])
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(num_syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _sentence(rng: random.Random, words: _WordSampler) -> str:
    words = [words() for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(1, len(words)), str(rng.randint(0, 2025)))
    if rng.random() < 0.3:
        comma_at = rng.randrange(1, len(words))
        words[comma_at - 1] += ","
    if rng.random() < 0.15:
        quoted = rng.randrange(len(words))
        words[quoted] = f'"{words[quoted].rstrip(",")}"'
    text = " ".join(words) + rng.choice(_PUNCT)
    return text[0].upper() + text[1:]


def _identifier(rng: random.Random, words: _WordSampler) -> str:
    parts = [words() for _ in range(rng.randint(1, 3))]
    return "_".join(p.strip('",') for p in parts)


def _code_line(rng: random.Random, words: _WordSampler) -> str:
    a, b = _identifier(rng, words), _identifier(rng, words)
    n = rng.randint(0, 512)
    templates = [
        f"def {a}({b}, num_{b}={n}):",
        f"    return {a}[{b}] + {n}",
        f"for {b} in range({n}):",
        f"    {a} = {{\"{b}\": {n}, \"ok\": true}}",
        f"if {a} is not None and len({b}) > {n}:",
        f"{a} = [{', '.join(str(rng.randint(0, 99)) for _ in range(rng.randint(1, 6)))}]",
        f"    raise ValueError(f\"{a} must be positive, got {{{b}}}\")",
        f"class {a.title().replace('_', '')}:",
        f"import {a}  # {b}",
        f"{a}.{b}({n}, key=\"{b}\")",
    ]
    return rng.choice(templates)


def _numbers_line(rng: random.Random, words: _WordSampler) -> str:
    x, y = rng.randint(0, 9999), rng.randint(1, 999)
    templates = [
        f"{x} + {y} = {x + y}",
        f"{x} * {y} = {x * y}",
        f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        f"{x / y:.3f} ({rng.randint(0, 100)}%)",
        f"0x{x:04x} 0b{y:b} {x}.{y}",
        f"#{y}: ${x}.{rng.randint(0, 99):02d} @ {rng.randint(0, 23)}:{rng.randint(0, 59):02d}",
    ]
    return rng.choice(templates)
