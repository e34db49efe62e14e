"""Built-in tasks: seeded generators of prompt pairs.

``induction`` works with any model (random tokens, repeated); ``ioi`` uses the zoo's synthetic
vocabulary on zoo models and Wang et al.'s templates on real LMs; ``dup`` is the zoo's
"which name occurs once" task; ``factual`` is a landmark → country recall task for real LMs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import DataError
from ..tokenizer import Tokenizer, WordTokenizer, single_token
from .vocab import NAME_VOCAB, SYMBOL_VOCAB, ZOO_FILLERS, ZOO_NAMES

if TYPE_CHECKING:  # tensors are built only when a task is made, so listing tasks stays light
    from .pairs import PromptPairs


@dataclass(frozen=True)
class TaskSpec:
    """A named generator ``make(tokenizer, n, seed, prepend_bos) -> PromptPairs``."""

    name: str
    description: str
    make: Callable[[Tokenizer, int, int, bool], PromptPairs]
    default_metric: str = "logit_diff"


def _is_vocab(tok: Tokenizer, vocab: Sequence[str]) -> bool:
    return isinstance(tok, WordTokenizer) and tok.vocab == list(vocab)


def _finish(name: str, tok: Tokenizer, rows: list[tuple[str, str, str | int, str | int]], bos: bool) -> PromptPairs:
    """Tokenize (clean, corrupt, answer, wrong) rows into prompt pairs (answers as text or token ids)."""
    from .pairs import PromptPairs

    clean, corrupt, ans, wrong, texts = [], [], [], [], []
    prefix = [tok.bos_id] if bos and tok.bos_id is not None else []
    for c, x, a, w in rows:
        clean.append(prefix + tok.encode(c))
        corrupt.append(prefix + tok.encode(x))
        ans.append(a if isinstance(a, int) else _one(tok, a))
        wrong.append(w if isinstance(w, int) else _one(tok, w))
        texts.append((c, x))
    pad = tok.bos_id if tok.bos_id is not None else 0
    return PromptPairs.from_lists(clean, corrupt, ans, wrong, pad_id=pad, name=name, texts=texts)


def _one(tok: Tokenizer, text: str) -> int:
    got = single_token(tok, text)
    if got is None:
        raise DataError(f"{text!r} is not a single known token of this tokenizer")
    return got


# --------------------------------------------------------------------------- induction
def _induction(tok: Tokenizer, n: int, seed: int, bos: bool, seg_len: int = 8, k: int = 5) -> PromptPairs:
    """``s1..sL s1..sk`` → ``s(k+1)``; the corrupt prompt swaps ``sk`` in the first copy for a
    fresh token ``r`` (the wrong answer), which breaks the previous-token → induction chain."""
    rng = random.Random(seed)
    if _is_vocab(tok, SYMBOL_VOCAB):
        pool = [tok.token_str(i) for i in range(1, len(SYMBOL_VOCAB))]
        rows = []
        for _ in range(n):
            seg = rng.sample(pool, seg_len + 1)
            s, r = seg[:seg_len], seg[seg_len]
            first = list(s)
            first[k - 1] = r
            rows.append((" ".join(s + s[:k]), " ".join(first + s[:k]), s[k], r))
        # The symbol vocabulary has BOS as a word; the zoo model always sees it first.
        return _finish("induction", tok, [("BOS " + c, "BOS " + x, a, w) for c, x, a, w in rows], False)
    from .pairs import PromptPairs

    ids = _plain_token_pool(tok)
    clean, corrupt, ans, wrong = [], [], [], []
    prefix = [tok.bos_id] if bos and tok.bos_id is not None else []
    for _ in range(n):
        seg = rng.sample(ids, seg_len + 1)
        s, r = seg[:seg_len], seg[seg_len]
        first = list(s)
        first[k - 1] = r
        clean.append(prefix + s + s[:k])
        corrupt.append(prefix + first + s[:k])
        ans.append(s[k])
        wrong.append(r)
    pad = tok.bos_id if tok.bos_id is not None else 0
    return PromptPairs.from_lists(clean, corrupt, ans, wrong, pad_id=pad, name="induction")


def _plain_token_pool(tok: Tokenizer, size: int = 2000) -> list[int]:
    """Ordinary word-like tokens of a real tokenizer: alphabetic and round-tripping through text."""
    hf = getattr(tok, "hf", None)
    vocab_size = len(hf) if hf is not None else len(getattr(tok, "vocab", ()))
    special = set(getattr(hf, "all_special_ids", []) or [])
    pool = []
    for i in range(min(vocab_size, 20000)):
        if i in special:
            continue
        text = tok.token_str(i)
        if text.strip().isalpha() and len(text.strip()) > 1 and single_token(tok, text) == i:
            pool.append(i)
        if len(pool) >= size:
            break
    if len(pool) < 50:
        raise DataError(f"task induction: the {tok.name} vocabulary has fewer than 50 plain word tokens to repeat; "
                        "use it with zoo:induction or a natural-language tokenizer")
    return pool


# --------------------------------------------------------------------------- zoo ioi and dup
def _zoo_ioi(tok: Tokenizer, n: int, seed: int) -> PromptPairs:
    """``BOS f… A AND B f… S GAVE f… TO`` → IO; corrupt replaces S's second mention by a third name."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        io, s, c = rng.sample(ZOO_NAMES, 3)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        fill = rng.choices(ZOO_FILLERS, k=13)
        cut = sorted(rng.sample(range(14), 2))
        f1, f2, f3 = fill[: cut[0]], fill[cut[0]: cut[1]], fill[cut[1]:]
        def prompt(second: str) -> str:
            return " ".join(["BOS", *f1, a, "AND", b, *f2, second, "GAVE", *f3, "TO"])
        rows.append((prompt(s), prompt(c), io, s))
    return _finish("ioi", tok, rows, False)


def _zoo_dup(tok: Tokenizer, n: int, seed: int, bos: bool = False, length: int = 16) -> PromptPairs:
    """Three name slots among fillers, two carry A and one B: answer the unique name B.
    The corrupt prompt turns one A into B, so A becomes unique and the answer flips."""
    if not _is_vocab(tok, NAME_VOCAB):
        raise DataError("task dup needs the zoo name vocabulary (use it with zoo:dup)")
    rng = random.Random(seed)
    rows = []
    slots = length - 2
    for _ in range(n):
        a, b = rng.sample(ZOO_NAMES, 2)
        pos = sorted(rng.sample(range(slots), 3))
        names = [a, a, b]
        rng.shuffle(names)
        seq = list(rng.choices(ZOO_FILLERS, k=slots))
        for p, name in zip(pos, names):
            seq[p] = name
        corrupt = list(seq)
        a_slots = [p for p, name in zip(pos, names) if name == a]
        corrupt[rng.choice(a_slots)] = b
        rows.append(("BOS " + " ".join(seq) + " TO", "BOS " + " ".join(corrupt) + " TO", b, a))
    return _finish("dup", tok, rows, False)


# --------------------------------------------------------------------------- real-LM ioi (Wang et al.)
_IOI_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [S] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [S] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [S] said to",
    "After [B] and [A] went to the [PLACE], [S] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [S] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [S] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [S] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [S] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [S] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [S] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [S] gave it to",
)
_IOI_NAMES = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda", "Daniel",
    "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason", "Justin", "Sarah",
    "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony", "Heather", "Eric",
    "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven", "Thomas", "Timothy", "Christina", "Kyle",
    "Rachel", "Laura", "Lauren", "Amber", "Brittany", "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy",
    "Crystal", "Michelle", "Tiffany", "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca",
    "Jacob", "Stephen", "Patrick", "Sean", "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin",
    "Paul", "Angela", "Tyler", "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa",
    "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon",
)
_IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
_IOI_OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")


def _ioi(tok: Tokenizer, n: int, seed: int, bos: bool) -> PromptPairs:
    if _is_vocab(tok, NAME_VOCAB):
        return _zoo_ioi(tok, n, seed)
    if isinstance(tok, WordTokenizer):
        raise DataError("task ioi needs a natural-language tokenizer or the zoo name vocabulary")
    names = [m for m in _IOI_NAMES if single_token(tok, " " + m) is not None]
    if len(names) < 3:
        raise DataError("task ioi: fewer than 3 names are single tokens (with a leading space) in this tokenizer")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        template = _IOI_TEMPLATES[i % len(_IOI_TEMPLATES)]
        io, s, c = rng.sample(names, 3)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        text = (template.replace("[PLACE]", rng.choice(_IOI_PLACES)).replace("[OBJECT]", rng.choice(_IOI_OBJECTS))
                .replace("[A]", a).replace("[B]", b))
        rows.append((text.replace("[S]", s), text.replace("[S]", c), " " + io, " " + s))
    return _finish("ioi", tok, rows, bos)


# --------------------------------------------------------------------------- factual recall
_FACTS = (
    ("The Eiffel Tower", "France"), ("The Colosseum", "Italy"), ("The Great Wall", "China"),
    ("The Statue of Liberty", "America"), ("Big Ben", "England"), ("The Taj Mahal", "India"),
    ("The Kremlin", "Russia"), ("The Sydney Opera House", "Australia"), ("Mount Fuji", "Japan"),
    ("The Acropolis", "Greece"), ("The Brandenburg Gate", "Germany"), ("The Alhambra", "Spain"),
    ("Machu Picchu", "Peru"), ("The Pyramids of Giza", "Egypt"), ("Table Mountain", "Africa"),
    ("The CN Tower", "Canada"), ("Christ the Redeemer", "Brazil"), ("Angkor Wat", "Cambodia"),
    ("The Leaning Tower of Pisa", "Italy"), ("The Louvre", "France"), ("Buckingham Palace", "England"),
    ("The Forbidden City", "China"), ("Chichen Itza", "Mexico"), ("Petra", "Jordan"),
    ("The Little Mermaid statue", "Denmark"), ("The Atomium", "Belgium"), ("Neuschwanstein Castle", "Germany"),
    ("The Blue Mosque", "Turkey"), ("Edinburgh Castle", "Scotland"), ("The Parthenon", "Greece"),
)


def _factual(tok: Tokenizer, n: int, seed: int, bos: bool) -> PromptPairs:
    """``<landmark> is located in the country of`` → country; the corrupt prompt names a landmark of
    another country with the same token length (pairs that cannot be matched are skipped)."""
    if isinstance(tok, WordTokenizer):
        raise DataError("task factual needs a natural-language tokenizer (a real LM such as gpt2)")
    template = "{} is located in the country of"
    facts = [(s, " " + c) for s, c in _FACTS]
    by_len: dict[int, list[tuple[str, str]]] = {}
    for s, c in facts:
        by_len.setdefault(len(tok.encode(template.format(s))), []).append((s, c))
    rng = random.Random(seed)
    first_id = {c: tok.encode(c)[0] for _, c in facts}
    candidates = [(a, b) for group in by_len.values() for a in group for b in group
                  if first_id[a[1]] != first_id[b[1]] and tok.unk_id not in (first_id[a[1]], first_id[b[1]])]
    if not candidates:
        raise DataError("task factual: no two landmarks of this tokenizer share a token length")
    rows = []
    for _ in range(n):
        (s, c), (s2, c2) = rng.choice(candidates)
        rows.append((template.format(s), template.format(s2), first_id[c], first_id[c2]))
    return _finish("factual", tok, rows, bos)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("induction", "repeat a random token sequence; corrupt breaks the previous-token cue", _induction),
        TaskSpec("ioi", "indirect object identification (zoo vocabulary or Wang et al. templates)", _ioi),
        TaskSpec("dup", "answer the name that occurs once (zoo vocabulary)", lambda t, n, s, b: _zoo_dup(t, n, s)),
        TaskSpec("factual", "landmark → country recall for real LMs", _factual),
    )
}


def task_spec(name: str) -> TaskSpec:
    """The built-in task called ``name``, or a one-line error listing them."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}, or a file of your own prompt pairs")
    return TASKS[name]


def make_task(name: str, tokenizer: Tokenizer | None, n: int = 64, seed: int = 0, prepend_bos: bool = True) -> PromptPairs:
    """``n`` prompt pairs of a built-in task, reproducible from ``seed``."""
    spec = task_spec(name)
    if tokenizer is None:
        raise DataError(f"task {name} needs a tokenizer, and this model has none; build pairs from token ids with "
                        "PromptPairs.from_tokens")
    if n < 1:
        raise DataError("the number of prompt pairs must be at least 1")
    return spec.make(tokenizer, n, seed, prepend_bos)
