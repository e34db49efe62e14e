"""Prompt pairs, built-in tasks, user files and their error messages."""

import json

import pytest
import torch

from edgeatp.errors import DataError
from edgeatp.tasks import Direction, PromptPairs, load_pairs, make_task
from edgeatp.tasks.vocab import NAME_VOCAB
from edgeatp.tokenizer import HFTokenizer, WordTokenizer

TOK = WordTokenizer(NAME_VOCAB)


def test_builtin_zoo_tasks_are_seeded_and_well_formed(zoo_ioi, zoo_dup, zoo_induction):
    for adapter in (zoo_ioi, zoo_dup, zoo_induction):
        task = adapter.card["task"]
        a = make_task(task, adapter.tokenizer, 20, seed=7)
        b = make_task(task, adapter.tokenizer, 20, seed=7)
        assert torch.equal(a.clean, b.clean) and torch.equal(a.answer, b.answer)
        assert not torch.equal(a.clean, make_task(task, adapter.tokenizer, 20, seed=8).clean)
        assert torch.equal(a.lengths, torch.full((20,), a.n_positions))
        assert bool((a.clean != a.corrupt).any(1).all()), "every pair must differ somewhere"
        assert bool((a.answer != a.wrong[:, 0]).all())


def test_ioi_zoo_prompt_structure():
    pairs = make_task("ioi", TOK, 50, seed=1)
    for (clean, corrupt), ans, wrong in zip(pairs.texts, pairs.answer.tolist(), pairs.wrong[:, 0].tolist()):
        c, x = clean.split(), corrupt.split()
        io, s = TOK.token_str(ans), TOK.token_str(wrong)
        assert c[-1] == "TO" and c.count(s) == 2 and c.count(io) == 1
        assert x.count(s) == 1 and [i for i in range(len(c)) if c[i] != x[i]] == [c.index("GAVE") - 1]


def _word_level(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                               unk_token="<|endoftext|>"))


def test_real_lm_tasks_with_a_natural_language_tokenizer():
    from edgeatp.tasks import builtin as b

    words = set(b._IOI_NAMES)
    for t in b._IOI_TEMPLATES:
        for place in b._IOI_PLACES:
            for obj in b._IOI_OBJECTS:
                words |= set(t.replace("[PLACE]", place).replace("[OBJECT]", obj).split())
    for s, c in b._FACTS:
        words |= set(s.split()) | {c}
    words |= set("is located in the country of".split())
    tok = _word_level(words)
    ioi = make_task("ioi", tok, 30, seed=2, prepend_bos=True)
    assert ioi.clean[:, 0].tolist() == [tok.bos_id] * 30
    for (clean, corrupt), a, w in zip(ioi.texts, ioi.answer.tolist(), ioi.wrong[:, 0].tolist()):
        io, s = tok.token_str(a), tok.token_str(w)
        assert clean.split().count(s) == 2 and corrupt.split().count(s) == 1 and io in clean.split()
    factual = make_task("factual", tok, 10, seed=0, prepend_bos=False)
    assert bool((factual.answer != factual.wrong[:, 0]).all())
    assert bool((factual.clean != factual.corrupt).any(1).all())
    letters = "abcdefghij"
    induction = make_task("induction", _word_level({f"tok{a}{b}" for a in letters for b in letters}), 5,
                          prepend_bos=False)
    assert induction.n_positions == 13
    with pytest.raises(DataError, match="fewer than 3 names are single tokens"):
        make_task("ioi", _word_level({"Mary", "hello"}), 4)


def test_unknown_task_and_missing_tokenizer():
    with pytest.raises(DataError, match="unknown task 'nope'.*your own prompt pairs"):
        make_task("nope", TOK)
    with pytest.raises(DataError, match="needs a tokenizer"):
        make_task("ioi", None)
    with pytest.raises(DataError, match="zoo name vocabulary"):
        make_task("dup", WordTokenizer(["BOS", "a"]), 2)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = [
    {"clean": "BOS Alice AND Bob Bob GAVE TO", "corrupt": "BOS Alice AND Bob Carol GAVE TO", "answer": "Alice", "wrong": "Bob"},
    {"clean": "BOS Dave AND Eve Eve GAVE f1 TO", "corrupt": "BOS Dave AND Eve Frank GAVE f1 TO", "answer": "Dave",
     "wrong": ["Eve", "Frank"]},
]


def test_jsonl_and_csv_files(tmp_path):
    jl = _write(tmp_path, "pairs.jsonl", "\n".join(json.dumps(r) for r in GOOD) + "\n\n")
    pairs = load_pairs(jl, TOK, prepend_bos=False)
    assert len(pairs) == 2 and pairs.lengths.tolist() == [7, 8] and pairs.n_positions == 8
    assert pairs.wrong.tolist() == [[TOK.ids["Bob"], -1], [TOK.ids["Eve"], TOK.ids["Frank"]]]
    assert pairs.clean[0, -1].item() == TOK.bos_id, "padding uses the pad id after the prompt"
    csv = _write(tmp_path, "pairs.csv", "clean,corrupt,answer,wrong\n" + "\n".join(
        f"{r['clean']},{r['corrupt']},{r['answer']},{'|'.join(r['wrong']) if isinstance(r['wrong'], list) else r['wrong']}"
        for r in GOOD))
    from_csv = load_pairs(csv, TOK, prepend_bos=False)
    assert torch.equal(from_csv.clean, pairs.clean) and torch.equal(from_csv.wrong, pairs.wrong)


@pytest.mark.parametrize("name,text,message", [
    ("empty.jsonl", "  \n", "the file is empty"),
    ("bad.jsonl", json.dumps(GOOD[0]) + "\n{not json}\n", "line 2: not valid JSON"),
    ("list.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
    ("missing.jsonl", json.dumps({"clean": "BOS Alice", "corrupt": "BOS Bob", "answer": "Alice"}) + "\n",
     "line 1: missing wrong"),
    ("lengths.jsonl", json.dumps({**GOOD[0], "corrupt": "BOS Alice AND Bob Carol Dave GAVE TO"}) + "\n",
     "line 1: clean is 7 tokens but corrupt is 8; rewrite the corrupt prompt"),
    ("answer.jsonl", json.dumps({**GOOD[0], "answer": "Alice Bob"}) + "\n", "line 1: answer 'Alice Bob' is 2 tokens"),
    ("word.jsonl", json.dumps({**GOOD[0], "clean": "BOS Zed AND Bob Bob GAVE TO"}) + "\n", "line 1: unknown word 'Zed'"),
    ("nocol.csv", "clean,corrupt,answer\na,b,c\n", "missing column\\(s\\) wrong"),
    ("extra.csv", "clean,corrupt,answer,wrong\nBOS,BOS,Alice,Bob,oops\n", "row 2: more fields than header"),
    ("types.txt", "x", "unknown file type '.txt'"),
])
def test_bad_input_files_name_the_row_and_the_fix(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message) as exc:
        load_pairs(_write(tmp_path, name, text), TOK, prepend_bos=False)
    assert "\n" not in str(exc.value)


def test_missing_file_and_context_length(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "nope.jsonl", TOK)
    jl = _write(tmp_path, "long.jsonl", json.dumps(GOOD[0]) + "\n")
    with pytest.raises(DataError, match="the prompt is 7 tokens but the model's context is 5"):
        load_pairs(jl, TOK, prepend_bos=False, n_ctx=5)


def test_single_token_hint_for_leading_space():
    class Spacey(WordTokenizer):
        def encode(self, text):
            return [1] if text == " Mary" else [1, 2]
    with pytest.raises(DataError, match="' Mary' \\(with a leading space\\) is a single token"):
        from edgeatp.tasks.files import _single_token
        _single_token(Spacey(["a", "b", "c"]), "Mary", "answer", "row 2")


def test_prompt_pairs_validation_and_batching():
    with pytest.raises(DataError, match="pair 1: clean is 2 tokens but corrupt is 3"):
        PromptPairs.from_lists([[1, 2], [1, 2]], [[1, 2], [1, 2, 3]], [1, 1], [2, 2])
    with pytest.raises(DataError, match="answer position 5 outside its 2 tokens"):
        PromptPairs.from_lists([[1, 2]], [[1, 3]], [1], [2], answer_pos=[5])
    pairs = PromptPairs.from_lists([[1, 2, 3], [4, 5], [6, 7, 8]], [[1, 2, 9], [4, 9], [6, 7, 9]], [1, 2, 3], [4, 5, 6])
    batches = list(pairs.batches(2, Direction.DENOISING))
    assert [b.index.tolist() for b in batches] == [[0, 1], [2]]
    assert torch.equal(batches[0].base, pairs.corrupt[:2]) and torch.equal(batches[0].source, pairs.clean[:2])
    grouped = list(pairs.batches(3, same_length=True))
    assert [b.index.tolist() for b in grouped] == [[1], [0, 2]]
    assert pairs.subset([1]).n_positions == 2
