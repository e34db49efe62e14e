"""Local checkpoint folders of every decoder family TransformerLens converts, against Hugging Face.

Each family is a tiny random checkpoint written at test time (transformers config, ``from_config``,
``save_pretrained``; nothing downloaded) with a tokenizer trained here, in a folder named like an
official model, so TransformerLens' name-keyed configs would be wrong for it. Oracles: the logits
of the Hugging Face model itself, TransformerLens' split-input per-head gradients edge by edge,
and the command line end to end.
"""

import io
import itertools
import logging
import json
import shutil
from dataclasses import dataclass, replace
from typing import Any, Callable

import pytest
import torch
import transformers as tf
from click.testing import CliRunner

import edgeatp
from edgeatp.cli import main
from edgeatp.errors import ModelError
from edgeatp.model.checkpoint import hooked_transformer, open_checkpoint
from edgeatp.model_config import describe_model

from .test_attribution_edges import _split_input_reference

V, H, NH, L, FF, P = 320, 32, 4, 2, 64, 64
NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "Kate", "Paul"]
CORPUS = [f"When {a} and {b} went to the {place}, {b} gave a {thing} to {a}"
          for a, b in itertools.permutations(NAMES, 2) for place, thing in (("store", "drink"), ("park", "ball"))]
LLAMA = dict(vocab_size=V, hidden_size=H, num_attention_heads=NH, num_hidden_layers=L, intermediate_size=FF,
             max_position_embeddings=P)
NEOX = dict(vocab_size=V, hidden_size=H, num_attention_heads=NH, num_hidden_layers=L, intermediate_size=FF,
            max_position_embeddings=P, rotary_pct=0.5)
QK_NORM = "QK normalisation"


@dataclass(frozen=True)
class Family:
    """A checkpoint folder to write: its name, its transformers config and its tokenizer (``bpe``: byte-level
    BPE without BOS, like GPT-2; ``sp``: SentencePiece that adds BOS, like Llama). ``refused`` names the
    feature edgeatp's attribution does not handle yet; when it does, set ``refused=None`` and the family
    runs the attribution and command-line checks too."""

    folder: str
    config: Callable[[], Any]
    tokenizer: str = "bpe"
    refused: str | None = None


FAMILIES = [
    Family("gpt2", lambda: tf.GPT2Config(vocab_size=V, n_embd=H, n_head=NH, n_layer=L, n_positions=P)),
    Family("pythia-70m", lambda: tf.GPTNeoXConfig(**NEOX, use_parallel_residual=True)),
    Family("my-pythia-sequential", lambda: tf.GPTNeoXConfig(**NEOX, use_parallel_residual=False)),
    Family("Llama-3-8B-Instruct", lambda: tf.LlamaConfig(**LLAMA), "sp"),
    Family("Qwen1.5-0.5B", lambda: tf.Qwen2Config(**LLAMA, num_key_value_heads=NH)),
    Family("gemma-7b", lambda: tf.GemmaConfig(**LLAMA, num_key_value_heads=NH, head_dim=H // NH), "sp"),
    Family("Phi-3-mini-4k-instruct", lambda: tf.Phi3Config(**LLAMA, pad_token_id=0), "sp"),
    Family("phi-2", lambda: tf.PhiConfig(**LLAMA)),
    Family("opt-125m", lambda: tf.OPTConfig(vocab_size=V, hidden_size=H, num_attention_heads=NH, num_hidden_layers=L,
                                            ffn_dim=FF, max_position_embeddings=P, word_embed_proj_dim=H)),
    Family("gpt-j-6b", lambda: tf.GPTJConfig(vocab_size=V, n_embd=H, n_head=NH, n_layer=L, n_positions=P,
                                             rotary_dim=4)),
    Family("bloom-560m", lambda: tf.BloomConfig(vocab_size=V, hidden_size=H, n_head=NH, n_layer=L)),
    Family("OLMo-1B-hf", lambda: tf.OlmoConfig(**LLAMA)),
    # Grouped-query attention, local windows, post-norm sublayers (Gemma-2) and soft-capping.
    Family("my-llama-ft", lambda: tf.LlamaConfig(**LLAMA, num_key_value_heads=2), "sp"),
    Family("Meta-Llama-3-8B", lambda: tf.LlamaConfig(**{**LLAMA, "max_position_embeddings": 256}, num_key_value_heads=1,
                                                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                                      "factor": 8.0, "low_freq_factor": 1.0,
                                                                      "high_freq_factor": 4.0,
                                                                      "original_max_position_embeddings": 16}),
           "sp"),
    Family("Mistral-7B-v0.1", lambda: tf.MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=4), "sp"),
    Family("Qwen2-0.5B", lambda: tf.Qwen2Config(**LLAMA, num_key_value_heads=2), "bpe"),
    Family("gemma-2-2b", lambda: tf.Gemma2Config(**LLAMA, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                                 query_pre_attn_scalar=12, attn_logit_softcapping=1.0,
                                                 final_logit_softcapping=0.5), "sp"),
    # Refused by the adapter today: logits are checked, attribution once the feature is supported.
    Family("gemma-3-1b-pt", lambda: tf.Gemma3TextConfig(**LLAMA, num_key_value_heads=1, head_dim=8, sliding_window=4,
                                                        layer_types=["sliding_attention", "full_attention"],
                                                        query_pre_attn_scalar=8), "sp", QK_NORM),
    Family("Phi-3-medium-gqa", lambda: tf.Phi3Config(**LLAMA, num_key_value_heads=2, pad_token_id=0), "sp"),
    Family("Qwen3-0.6B", lambda: tf.Qwen3Config(**LLAMA, num_key_value_heads=2, head_dim=8), "bpe", QK_NORM),
    Family("gpt-neo-125m", lambda: tf.GPTNeoConfig(vocab_size=V, hidden_size=H, num_heads=NH, num_layers=L,
                                                   max_position_embeddings=P, window_size=4,
                                                   attention_types=[[["global", "local"], 1]]), "bpe"),
    Family("OLMo-2-0425-1B", lambda: tf.Olmo2Config(**LLAMA), "bpe", "post-norm architecture"),
    Family("Olmo-3-7B", lambda: tf.Olmo3Config(**LLAMA, num_key_value_heads=2, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"]), "bpe",
           "post-norm architecture"),
    Family("OLMoE-1B-7B", lambda: tf.OlmoeConfig(**LLAMA, num_experts=4, num_experts_per_tok=2), "bpe",
           "mixture-of-experts"),
    Family("Mixtral-8x7B", lambda: tf.MixtralConfig(**LLAMA, num_key_value_heads=2, num_local_experts=4,
                                                    num_experts_per_tok=2), "sp", "mixture-of-experts"),
    Family("Apertus-8B", lambda: tf.ApertusConfig(**LLAMA, num_key_value_heads=NH), "sp", QK_NORM),
    Family("gpt-oss-20b", lambda: tf.GptOssConfig(**LLAMA, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                                  num_experts_per_tok=2, sliding_window=4,
                                                  layer_types=["sliding_attention", "full_attention"]), "bpe",
           "attention sinks"),
]
BY_FOLDER = {f.folder: f for f in FAMILIES}


def _bpe() -> Any:
    """A GPT-2-style byte-level BPE tokenizer (tokenizer.json); BOS = EOS = <|endoftext|>, not added by the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=V, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      unk_token="<|endoftext|>")


def _sentencepiece(folder: Any) -> Any:
    """A Llama-style SentencePiece tokenizer (tokenizer.model, converted by transformers) that adds <s>."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=120,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return tf.LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict:
    return {"bpe": _bpe(), "sp": _sentencepiece(tmp_path_factory.mktemp("sp") / "tok")}


def _write(folder: Any, config: Any, tokenizer: Any, dtype: torch.dtype = torch.float32, **save: Any) -> Any:
    """Save a random checkpoint (norms and biases perturbed, so folding is exercised) and its tokenizer;
    returns the float32 Hugging Face model that was saved."""
    torch.manual_seed(0)
    config.initializer_range = 0.2  # attention far from uniform, so masks, rotary and caps matter
    hf = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.to(dtype).save_pretrained(str(folder), **save)
    tokenizer.save_pretrained(str(folder))
    return hf.float().eval()


@pytest.fixture(scope="session")
def build(tmp_path_factory, tokenizers) -> Callable[[Family], tuple]:
    """``build(family) -> (folder, hf_model)``, each family written once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, tuple] = {}

    def get(family: Family) -> tuple:
        if family.folder not in made:
            folder = root / family.folder
            made[family.folder] = folder, _write(folder, family.config(), tokenizers[family.tokenizer])
        return made[family.folder]
    return get


def _pairs_file(path: Any, tokenizer: Any) -> Any:
    """A user JSONL file for this tokenizer: clean and corrupt differ by one name of the same token length."""
    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def one_token(name: str) -> str | None:
        return next((form for form in (" " + name, name) if len(enc(form)) == 1), None)

    rows = []
    for a, b, c in itertools.permutations(NAMES, 3):
        clean = f"When {a} and {b} went to the store, {b} gave a drink to"
        corrupt = f"When {a} and {b} went to the store, {c} gave a drink to"
        answer, wrong = one_token(a), one_token(b)
        if answer and wrong and len(enc(clean)) == len(enc(corrupt)):
            rows.append({"clean": clean, "corrupt": corrupt, "answer": answer, "wrong": wrong})
        if len(rows) == 4:
            break
    assert len(rows) == 4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def data_files(tmp_path_factory, tokenizers) -> dict:
    root = tmp_path_factory.mktemp("data")
    return {kind: _pairs_file(root / f"{kind}.jsonl", tok) for kind, tok in tokenizers.items()}


def _logit_gap(hf: Any, model: Any, seed: int = 1) -> float:
    """Largest difference of vocabulary-centred logits on random tokens."""
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a = hf(tokens).logits.double()
        b = model(tokens).double()
    return float(((a - a.mean(-1, keepdim=True)) - (b - b.mean(-1, keepdim=True))).abs().max())


# ------------------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.folder)
def test_logits_equal_the_hugging_face_model(family, build):
    folder, hf = build(family)
    model = hooked_transformer(open_checkpoint(folder))
    assert model.cfg.dtype == torch.float32 and model.cfg.d_model == H and model.cfg.n_layers == L
    assert _logit_gap(hf, model) <= 1e-4


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.refused is None], ids=lambda f: f.folder)
def test_accepted_families_attribute_exactly_and_run_the_command_line(family, build, data_files, tokenizers, tmp_path):
    folder, _ = build(family)
    data = data_files[family.tokenizer]
    adapter = edgeatp.load_model(str(folder), dtype="float64")
    assert adapter.dtype == torch.float64
    pairs = edgeatp.load_pairs(data, adapter.tokenizer, prepend_bos=adapter.prepend_bos, n_ctx=adapter.n_ctx)
    # BOS follows the checkpoint: once for SentencePiece (it adds <s> itself) and for GPT-2 (as
    # TransformerLens does for gpt2), never for other byte-level BPE tokenizers
    first = json.loads(data.read_text().splitlines()[0])["clean"]
    with_bos = family.tokenizer == "sp" or isinstance(family.config(), tf.GPT2Config)
    bos = [tokenizers[family.tokenizer].bos_token_id] if with_bos else []
    expected = bos + tokenizers[family.tokenizer].encode(first, add_special_tokens=False)
    assert adapter.prepend_bos == with_bos
    assert pairs.clean[0, :len(expected)].tolist() == expected
    fast = edgeatp.attribute_edges(edgeatp.Setup(adapter, pairs), "atp").per_pair[:, 0]
    assert float((fast - _split_input_reference(adapter, pairs)).abs().max()) <= 1e-8

    res = CliRunner().invoke(main, ["discover", "--model", str(folder), "--data", str(data), "--n-pairs", "4",
                                    "--verify", "3", "--sample-below", "2", "--format", "json", "--json",
                                    "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_pairs"] == 4 and summary["n_edges"] > 0 and (tmp_path / "circuit.json").exists()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.refused], ids=lambda f: f.folder)
def test_families_the_adapter_refuses_fail_with_its_one_line_error(family, build):
    # Enable this family's attribution checks (refused=None) when edgeatp supports the feature.
    folder, _ = build(family)
    with pytest.raises(ModelError, match=family.refused) as exc:
        edgeatp.load_model(str(folder))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.folder)
def test_the_planner_reads_every_family_from_its_config_json_alone(family, build, tmp_path):
    # A folder with nothing but config.json (what `edgeatp plan` is given for a model not downloaded yet)
    # describes the model the loader makes of the whole checkpoint, or gets the loader's one-line refusal.
    folder, _ = build(family)
    alone = tmp_path / family.folder
    alone.mkdir()
    shutil.copy(folder / "config.json", alone / "config.json")
    if family.refused:
        with pytest.raises(ModelError, match=family.refused) as exc:
            describe_model(str(alone))
        assert "\n" not in str(exc.value)
        return
    loaded = edgeatp.load_model(str(folder)).spec
    assert describe_model(str(alone)) == replace(loaded, name=family.folder)


# ------------------------------------------------------------------------------------------- refusals
def _copy(build: Callable, folder: str, dest: Any) -> Any:
    """A private copy of a built family's folder."""
    return shutil.copytree(build(BY_FOLDER[folder])[0], dest)


def _edit_config(folder: Any, **changes: Any) -> None:
    """Change settings in a folder's config.json."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _one_line_error(folder: Any, match: str) -> str:
    with pytest.raises(ModelError, match=match) as exc:
        edgeatp.load_model(str(folder))
    assert "\n" not in str(exc.value) and str(folder.name) in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("config,match", [
    (lambda: tf.FalconConfig(vocab_size=V, hidden_size=H, num_attention_heads=NH, num_hidden_layers=L,
                             architectures=["FalconForCausalLM"]),
     r"model type 'falcon' \(FalconForCausalLM\) is not a family TransformerLens 3.9 converts; supported model "
     r"types: gpt2, gpt_neo, .*llama"),
    (lambda: tf.MambaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, architectures=["MambaForCausalLM"]),
     r"model type 'mamba' \(MambaForCausalLM\) is not a family"),
    (lambda: tf.BertConfig(vocab_size=V, hidden_size=H, num_attention_heads=NH, num_hidden_layers=L,
                           architectures=["BertForMaskedLM"]), r"'bert' \(BertForMaskedLM\) is an encoder-only"),
    (lambda: tf.T5Config(vocab_size=V, d_model=H, num_heads=NH, num_layers=L,
                         architectures=["T5ForConditionalGeneration"]),
     r"'t5' \(T5ForConditionalGeneration\) is an encoder-decoder model"),
    (lambda: tf.LlamaConfig(**LLAMA, architectures=["LlamaForCausalLM"],
                            quantization_config={"quant_method": "gptq", "bits": 4}), "is gptq-quantized"),
], ids=["falcon", "mamba", "bert", "t5", "quantized"])
def test_checkpoints_that_cannot_be_converted_are_refused_from_config_json(config, match, tmp_path):
    folder = tmp_path / "model"
    config().save_pretrained(str(folder))  # config.json only: refused before weights are looked for
    _one_line_error(folder, match)


def test_remote_code_bad_and_missing_configs_are_one_line(tmp_path):
    folder = tmp_path / "Qwen-7B"
    folder.mkdir()
    remote = {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    (folder / "config.json").write_text(json.dumps({"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
                                                    "auto_map": remote}))
    _one_line_error(folder, "needs the checkpoint's own Python code")
    (folder / "config.json").write_text("{not json")
    _one_line_error(folder, r"config.json is not valid JSON")
    (folder / "config.json").write_text("[]")
    _one_line_error(folder, "is not a JSON object")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    _one_line_error(folder, r"config.json names no architecture \(model_type None\)")
    (folder / "config.json").unlink()
    _one_line_error(folder, "has no config.json")


@pytest.mark.parametrize("folder,config,match", [
    ("Llama-3-8B-Instruct", lambda: tf.LlamaConfig(**LLAMA, attention_bias=True), "attention_bias=true"),
    ("pythia-70m", lambda: tf.GPTNeoXConfig(**{**NEOX, "rotary_pct": None}, rope_parameters={
        "rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}), "rope_theta=500.0"),
    ("Qwen2-0.5B", lambda: tf.Qwen2Config(**LLAMA, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=0),
     "use_sliding_window=true"),
    ("Phi-3-mini-4k-instruct", lambda: tf.Phi3Config(**LLAMA, pad_token_id=0, partial_rotary_factor=0.5),
     "partial_rotary_factor=0.5"),
    ("bloom-560m", lambda: tf.BloomConfig(vocab_size=V, hidden_size=H, n_head=NH, n_layer=L,
                                          apply_residual_connection_post_layernorm=True),
     "apply_residual_connection_post_layernorm=true"),
], ids=["llama-attention-bias", "neox-rope-theta", "qwen2-sliding-window", "phi3-partial-rotary",
        "bloom-post-ln-residual"])
def test_settings_transformerlens_ignores_are_refused(folder, config, match, tokenizers, tmp_path, monkeypatch):
    import edgeatp.model.checkpoint as checkpoint

    path = tmp_path / folder
    hf = _write(path, config(), tokenizers[BY_FOLDER[folder].tokenizer])
    _one_line_error(path, f"sets {match}, which TransformerLens 3.9 ignores")
    monkeypatch.setattr(checkpoint, "ignored_features", lambda arch, c: [])
    assert _logit_gap(hf, hooked_transformer(open_checkpoint(path))) > 1e-2, "without the refusal the logits are wrong"


def test_missing_truncated_and_mismatched_weights_name_the_file(build, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(build(BY_FOLDER["Llama-3-8B-Instruct"])[0] / "config.json", empty)
    _one_line_error(empty, "has config.json but no weights")

    cut = _copy(build, "Llama-3-8B-Instruct", tmp_path / "truncated")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "model.safetensors is truncated or not a safetensors file" in _one_line_error(cut, "truncated")

    for name, changes, match in [("wider", {"intermediate_size": 2 * FF}, r"\d+ tensors have other shapes \(e.g. "),
                                 ("deeper", {"num_hidden_layers": L + 1}, r"\d+ tensors are missing"),
                                 ("shallower", {"num_hidden_layers": L - 1}, r"\d+ tensors are not used by")]:
        folder = _copy(build, "Llama-3-8B-Instruct", tmp_path / name)
        _edit_config(folder, **changes)
        _one_line_error(folder, "the weights do not match config.json: " + match)


def test_sharded_safetensors_load_and_a_missing_shard_is_named(tokenizers, tmp_path):
    folder = tmp_path / "Llama-2-7b-hf"
    hf = _write(folder, tf.LlamaConfig(**LLAMA), tokenizers["sp"], max_shard_size="30KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    assert _logit_gap(hf, edgeatp.load_model(str(folder)).model) <= 1e-4
    shards[-1].unlink()
    _one_line_error(folder, f"lists 1 shard\\(s\\) that are not in the folder \\(e.g. {shards[-1].name}\\)")


def test_bfloat16_checkpoints_stay_bfloat16_unless_a_dtype_is_given(tokenizers, tmp_path):
    folder = tmp_path / "Llama-3.2-1B"
    _write(folder, tf.LlamaConfig(**LLAMA), tokenizers["sp"], dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert edgeatp.load_model(str(folder)).dtype == torch.bfloat16
    as_float = edgeatp.load_model(str(folder), dtype="float32")
    saved = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    assert as_float.dtype == torch.float32 and _logit_gap(saved, as_float.model) <= 1e-4


def test_name_trap_folders_get_their_own_config_and_the_patch_is_always_undone(build, monkeypatch, tmp_path):
    import tempfile

    import transformer_lens.loading_from_pretrained as loading

    original = loading.AutoConfig, loading.convert_hf_model_config
    folder, hf = build(BY_FOLDER["Meta-Llama-3-8B"])
    assert loading.get_pretrained_model_config(str(folder)).d_model == 4096, "TransformerLens alone takes the name"
    trap = tmp_path / "llama-tmp"  # a temporary folder whose path is itself a trigger is not used
    trap.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(trap))
    cfg = open_checkpoint(folder).cfg
    assert (cfg.d_model, cfg.n_key_value_heads, cfg.n_ctx) == (H, 1, 256)
    assert (loading.AutoConfig, loading.convert_hf_model_config) == original

    def broken(*args, **kwargs):
        assert loading.AutoConfig is not original[0]
        raise RuntimeError("translation failed\nsecond line")
    monkeypatch.setattr(loading, "get_pretrained_model_config", broken)
    with pytest.raises(ModelError, match=r"cannot translate this llama config \(RuntimeError: translation failed\)$"):
        edgeatp.load_model(str(folder))
    assert (loading.AutoConfig, loading.convert_hf_model_config) == original


def test_sentencepiece_only_tokenizer_gets_bos_exactly_once(build, tokenizers, tmp_path):
    folder = _copy(build, "Llama-3-8B-Instruct", tmp_path / "Llama-2-7b-chat-hf")
    (folder / "tokenizer.json").unlink()
    _one_line_error(folder, "has tokenizer_config.json but no vocabulary")
    # tokenizer.model and tokenizer_config.json with add_bos_token, as Llama-2 ships them
    shutil.copy(f"{tokenizers['sp'].name_or_path}/tokenizer.model", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    adapter = edgeatp.load_model(str(folder))
    bos = adapter.bos_id
    assert adapter.prepend_bos and bos is not None
    data = tmp_path / "pairs.jsonl"
    text = "When Mary and John went to the store, {} gave a drink to"
    data.write_text("".join(json.dumps({"clean": prefix + text.format("John"), "corrupt": prefix + text.format("Anna"),
                                        "answer": "Mary", "wrong": "John"}) + "\n" for prefix in ("", "<s>")))
    pairs = edgeatp.load_pairs(data, adapter.tokenizer, prepend_bos=adapter.prepend_bos)
    assert pairs.clean[:, 0].tolist() == [bos, bos] and bos not in pairs.clean[:, 1].tolist()  # a literal <s> too
    assert adapter.model.to_tokens("When Mary")[0].tolist().count(bos) == 1  # TransformerLens agrees


def test_loading_prints_nothing_and_honours_disabled_progress_bars(build, capfd, caplog, monkeypatch):
    import transformers.utils.logging as tlog

    folder, _ = build(BY_FOLDER["Llama-3-8B-Instruct"])
    tlog.enable_progress_bar()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    edgeatp.load_model(str(folder))
    assert "Loading weights" in capfd.readouterr().err, "transformers shows its bar unless told not to"
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    edgeatp.load_model(str(folder))
    assert capfd.readouterr() == ("", "")
    assert tlog.is_progress_bar_enabled()
    # in reduced precision too: no advice about TransformerLens calls the user does not make
    with caplog.at_level(logging.WARNING):
        edgeatp.load_model(str(folder), dtype="bfloat16")
    assert capfd.readouterr() == ("", "") and not caplog.records
    assert not logging.getLogger().filters
