"""The zoo models' word vocabularies (plain data, no imports, so listings stay instant)."""

ZOO_NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy",
    "Mallory", "Nina", "Oscar", "Peggy", "Rupert", "Sybil", "Trent", "Ursula", "Victor", "Wendy",
)
ZOO_FILLERS = tuple(f"f{i}" for i in range(40))
NAME_VOCAB = ("BOS", "AND", "GAVE", "TO", *ZOO_NAMES, *ZOO_FILLERS)  # 64 words: the ioi and dup models
SYMBOL_VOCAB = ("BOS", *(f"t{i}" for i in range(1, 64)))  # 64 words: the induction model
