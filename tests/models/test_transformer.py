"""The Transformer encoder-decoder against an independent torch model, and its decoding.

- logits of the compiled (fused) graph equal torch's nn.Transformer with the same weights;
- the key/value-cache step gives the full recomputation's logits at every step;
- beam search: beam 1 is greedy, a wider beam scores at least as well, and a beam as large
  as the search space finds exactly what brute force over every sequence finds;
- the paper's base config has torch's parameters; bad inputs raise attngraph errors.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import attngraph as ag  # noqa: E402
from attngraph.models import decoding  # noqa: E402
from attngraph.models import transformer as T  # noqa: E402

PAD, SOS, EOS = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# an independent torch model: the same architecture written with torch.nn
# ------------------------------------------------------------------------------------------------

class TorchSeq2Seq(torch.nn.Module):
    def __init__(self, cfg: T.TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.d, self.pad = d, cfg.pad_id
        self.src_embed = torch.nn.Embedding(cfg.src_vocab, d)
        self.tgt_embed = torch.nn.Embedding(cfg.tgt_vocab, d)
        self.transformer = torch.nn.Transformer(d, cfg.nhead, cfg.num_encoder_layers, cfg.num_decoder_layers,
                                                cfg.dim_feedforward, cfg.dropout, cfg.activation,
                                                batch_first=True, norm_first=cfg.norm_first)
        self.generator = torch.nn.Linear(d, cfg.tgt_vocab)

    def positions(self, n):   # the PyTorch tutorial's PositionalEncoding, computed in float64
        pos = torch.arange(n, dtype=torch.float64)[:, None]
        div = torch.exp(torch.arange(0, self.d, 2, dtype=torch.float64) * (-math.log(10000.0) / self.d))
        pe = torch.zeros(n, self.d, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        return pe.float()

    def forward(self, src, tgt):
        s = self.src_embed(src) * math.sqrt(self.d) + self.positions(src.shape[1])
        t = self.tgt_embed(tgt) * math.sqrt(self.d) + self.positions(tgt.shape[1])
        pad = src == self.pad
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        y = self.transformer(s, t, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        return self.generator(y)


def torch_pair(cfg, seed=0):
    """(attngraph model, torch model) with the same random weights (biases included)."""
    torch.manual_seed(seed)
    ref = TorchSeq2Seq(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = T.Seq2SeqTransformer(cfg)
    model.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    return model, ref


def random_ids(rng, n, length, vocab, lengths=None):
    """(n, length) ids in 3..vocab-1, <pad> after each row's length."""
    ids = rng.integers(3, vocab, size=(n, length))
    if lengths is not None:
        for i, k in enumerate(lengths):
            ids[i, k:] = PAD
    return ids.astype(np.int64)


pytestmark = pytest.mark.usefixtures("one_thread_module")   # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def tiny():
    cfg = T.TransformerConfig.tiny(13, 11)
    return (cfg, *torch_pair(cfg))


# ------------------------------------------------------------------------------------------------
# the full forward against torch
# ------------------------------------------------------------------------------------------------

def test_logits_equal_torch_with_padding_and_causal_mask(tiny, rng):
    cfg, model, ref = tiny
    src = random_ids(rng, 3, 7, cfg.src_vocab, lengths=[7, 4, 2])       # source padding
    tgt = random_ids(rng, 3, 6, cfg.tgt_vocab)
    tgt[:, 0] = SOS
    with torch.no_grad():
        want = ref(torch.from_numpy(src), torch.from_numpy(tgt)).numpy()
    got = model.logits(src, tgt)                                        # src bucketed to 8, fused cpu graph
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    counts = model.compiled("logits").graph.op_counts()
    assert counts.get("attention") == cfg.num_encoder_layers + 2 * cfg.num_decoder_layers
    assert "softmax" not in counts


def test_pre_norm_gelu_weights_from_safetensors_equal_torch(tmp_path, rng):
    from safetensors.torch import save_file

    cfg = T.TransformerConfig.tiny(9, 10, norm_first=True, activation="gelu", num_encoder_layers=1,
                                   num_decoder_layers=1)
    torch.manual_seed(1)
    ref = TorchSeq2Seq(cfg).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    model = T.Seq2SeqTransformer(cfg)
    model.load_state_dict(ag.io.load_safetensors(tmp_path / "w.safetensors"))
    src = random_ids(rng, 2, 5, cfg.src_vocab, lengths=[5, 3])
    tgt = random_ids(rng, 2, 4, cfg.tgt_vocab)
    with torch.no_grad():
        want = ref(torch.from_numpy(src), torch.from_numpy(tgt)).numpy()
    np.testing.assert_allclose(model.logits(src, tgt), want, rtol=1e-5, atol=1e-5)


def test_training_graph_loss_is_torch_cross_entropy_ignoring_pad(tiny, rng):
    cfg, model, ref = tiny
    src = random_ids(rng, 2, 8, cfg.src_vocab, lengths=[8, 5])
    tgt_in = random_ids(rng, 2, 5, cfg.tgt_vocab, lengths=[5, 3])
    tgt_out = random_ids(rng, 2, 5, cfg.tgt_vocab, lengths=[5, 2])
    exe = model.compiled("train")
    loss = exe.run({"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out})["loss"]
    with torch.no_grad():
        logits = ref(torch.from_numpy(src), torch.from_numpy(tgt_in))
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.tgt_vocab),
                                                 torch.from_numpy(tgt_out).reshape(-1), ignore_index=PAD)
    np.testing.assert_allclose(loss, want.numpy(), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the key/value cache
# ------------------------------------------------------------------------------------------------

def test_kv_cache_steps_equal_full_recomputation(tiny, rng):
    cfg, model, _ = tiny
    src = random_ids(rng, 3, 6, cfg.src_vocab, lengths=[6, 3, 5])
    seq = random_ids(rng, 3, 13, cfg.tgt_vocab)                         # 13 steps: the cache grows 8 → 16
    seq[:, 0] = SOS
    full = model.logits(src, seq)                                       # (3, 13, V)
    state = model.incremental(src)
    for t in range(6):
        np.testing.assert_allclose(state.step_logits(seq[:, t]), full[:, t], rtol=1e-5, atol=1e-5)
    rows = np.array([2, 0, 0, 1])                                       # beam search's reordering
    state.reorder(rows)
    full = model.logits(src[rows], seq[rows])
    for t in range(6, 13):
        np.testing.assert_allclose(state.step_logits(seq[rows, t]), full[:, t], rtol=1e-5, atol=1e-5)
    assert state.capacity == 16
    step = model.compiled("step")
    assert step.graph.op_counts().get("attention") == 2 * cfg.num_decoder_layers
    # the step graph reads the cache but never the earlier tokens: no (T, T) scores anywhere
    assert set(step.graph.inputs) >= {"tokens", "position", "self_k_0", "cross_k_0", "memory_pad"}


def test_a_step_costs_o_t_and_a_recompute_o_t_squared(tiny):
    from attngraph.cli import graph_cost

    cfg, model, _ = tiny
    step, full = model.build_graph("step"), model.build_graph("logits")

    def flops(graph, **dims):
        return graph_cost(graph, {"B": 1, "S": 8, **dims}).flops

    s = [flops(step, C=c) for c in (64, 128, 256)]                     # cache capacity C
    f = [flops(full, T=t) for t in (64, 128, 256)]                      # prefix length T
    assert s[2] - s[1] == 2 * (s[1] - s[0]) > 0                         # affine in C
    assert f[2] - f[1] > 2.2 * (f[1] - f[0])                            # grows faster than linearly


# ------------------------------------------------------------------------------------------------
# greedy and beam search
# ------------------------------------------------------------------------------------------------

def test_greedy_with_and_without_cache_and_beam_one_agree(tiny, rng):
    cfg, model, _ = tiny
    src = random_ids(rng, 4, 6, cfg.src_vocab, lengths=[6, 6, 3, 4])
    greedy = T.greedy_decode(model, src, max_len=10)
    again = T.greedy_decode(model, src, max_len=10, cache=False)
    np.testing.assert_array_equal(greedy.tokens, again.tokens)
    np.testing.assert_allclose(greedy.scores, again.scores, rtol=1e-5)
    beam1 = T.beam_search(model, src, beam_size=1, max_len=10)
    np.testing.assert_array_equal(beam1.tokens, greedy.tokens)
    np.testing.assert_allclose(beam1.scores, greedy.scores, rtol=1e-5)
    # the scores are the sums of the produced tokens' log-probabilities (teacher forcing check)
    tgt_in = np.concatenate([np.full((4, 1), SOS), greedy.tokens[:, :-1]], axis=1)
    logits = model.logits(src, tgt_in).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for b in range(4):
        n = greedy.lengths[b]
        assert n == 10 or greedy.tokens[b, n - 1] == EOS
        assert (greedy.tokens[b, n:] == PAD).all() and not np.isin(greedy.tokens[b, :n], [PAD, SOS]).any()
        want = logp[b, np.arange(n), greedy.tokens[b, :n]].sum()
        np.testing.assert_allclose(greedy.scores[b], want, rtol=1e-5)


def test_wider_beam_scores_at_least_greedy(tiny, rng):
    cfg, model, _ = tiny
    src = random_ids(rng, 5, 6, cfg.src_vocab, lengths=[6, 2, 5, 6, 3])
    greedy = T.greedy_decode(model, src, max_len=8)
    beam = T.beam_search(model, src, beam_size=4, max_len=8)
    # (float32 logits of a batch of 5 and of 5×4 beams may differ in the last bits)
    assert (beam.scores >= greedy.scores - 1e-5).all()
    assert (beam.scores > greedy.scores + 0.1).sum() >= 2               # the beam found better ones
    for b in range(5):                                                  # eos ends every hypothesis, pad after
        n = beam.lengths[b]
        assert n == 8 or beam.tokens[b, n - 1] == EOS
        assert (beam.tokens[b, n:] == PAD).all()


def _brute_force(model, src_row, max_len, alpha):
    """Every sequence over the allowed tokens that ends at <eos> or at max_len, scored by
    teacher forcing through the full logits graph (no cache, no search)."""
    vocab = model.cfg.tgt_vocab
    allowed = [t for t in range(vocab) if t not in (PAD, SOS)]
    seqs = []
    for n in range(1, max_len + 1):
        for body in itertools.product([t for t in allowed if t != EOS], repeat=n - 1):
            seqs.append(list(body) + [EOS])
        if n == max_len:
            seqs += [list(body) for body in itertools.product([t for t in allowed if t != EOS], repeat=n)]
    tgt_in = T.pad_batch([[SOS] + s[:-1] for s in seqs], PAD, length=max_len)
    logits = model.logits(np.repeat(src_row[None], len(seqs), axis=0), tgt_in).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    scored = []
    for i, s in enumerate(seqs):
        raw = sum(logp[i, t, tok] for t, tok in enumerate(s))
        scored.append((raw / decoding.length_penalty_factor(len(s), alpha), raw, s))
    return sorted(scored, key=lambda x: -x[0])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_large_beam_equals_exhaustive_search(rng, alpha):
    cfg = T.TransformerConfig.tiny(7, 5, num_encoder_layers=1, num_decoder_layers=1)   # targets: eos, 3, 4
    model, _ = torch_pair(cfg, seed=3)
    src = random_ids(rng, 2, 5, cfg.src_vocab, lengths=[5, 3])
    max_len = 4                                                         # 2+4+8 prefixes, 31 sequences
    result = T.beam_search(model, src, beam_size=32, max_len=max_len, length_penalty=alpha)
    for b in range(2):
        want = _brute_force(model, src[b], max_len, alpha)
        got = result.beams[b]
        assert len(got) == len(want) == 31
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
        best = want[0][2]
        np.testing.assert_array_equal(result.tokens[b, :len(best)], best)
        assert (result.tokens[b, len(best):] == PAD).all()
        np.testing.assert_allclose(result.scores[b], want[0][1], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the base config and bad inputs
# ------------------------------------------------------------------------------------------------

def test_base_config_has_torch_parameters():
    cfg = T.TransformerConfig.base(1000, 1200)
    assert (cfg.d_model, cfg.nhead, cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.dim_feedforward,
            cfg.dropout, cfg.norm_first) == (512, 8, 6, 6, 2048, 0.1, False)
    model = T.Seq2SeqTransformer(cfg)
    ref = TorchSeq2Seq(cfg)
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    model.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})   # strict: same keys and shapes
    g = model.build_graph("step")                                       # builds; nothing is run
    assert g.inputs["self_k_5"].type.shape[1:] == (8, "C", 64)
    assert len(g.params) == sum(1 for k in ref.state_dict() if "encoder" not in k and "src_embed" not in k)


def test_shared_embeddings_tie_source_target_and_generator(rng):
    cfg = T.TransformerConfig.tiny(9, 9, share_embeddings=True, num_encoder_layers=1, num_decoder_layers=1)
    model = T.Seq2SeqTransformer(cfg).reset_parameters(0)
    assert [k for k in model.state_dict() if "embed" in k or "generator" in k] == ["embed.weight"]
    torch.manual_seed(0)
    ref = TorchSeq2Seq(cfg).eval()
    sd = model.state_dict()
    weights = {k: torch.from_numpy(v) for k, v in sd.items() if k != "embed.weight"}
    table = torch.from_numpy(sd["embed.weight"])
    weights.update({"src_embed.weight": table, "tgt_embed.weight": table, "generator.weight": table,
                    "generator.bias": torch.zeros(cfg.tgt_vocab)})
    ref.load_state_dict(weights)
    src = random_ids(rng, 2, 5, 9, lengths=[5, 2])
    tgt = random_ids(rng, 2, 3, 9)
    with torch.no_grad():
        want = ref(torch.from_numpy(src), torch.from_numpy(tgt)).numpy()
    np.testing.assert_allclose(model.logits(src, tgt, backend="numpy"), want, rtol=1e-5, atol=1e-5)


def test_weights_loaded_after_compiling_reach_the_executables(tiny, rng):
    cfg, model, _ = tiny
    other = T.Seq2SeqTransformer(cfg).reset_parameters(7)
    src = random_ids(rng, 1, 4, cfg.src_vocab)
    before = other.logits(src, np.array([[SOS, 3]]))
    other.load_state_dict(model.state_dict())
    np.testing.assert_allclose(other.logits(src, np.array([[SOS, 3]])), model.logits(src, np.array([[SOS, 3]])))
    assert not np.allclose(before, other.logits(src, np.array([[SOS, 3]])))


def test_bad_inputs_raise_attngraph_errors(tiny):
    cfg, model, _ = tiny
    errors = ag.errors
    with pytest.raises(errors.DTypeError):
        T.greedy_decode(model, np.ones((2, 3), np.float32))
    with pytest.raises(errors.ShapeError):
        T.greedy_decode(model, np.ones((1, cfg.max_len + 1), np.int64))            # too long a source
    with pytest.raises(errors.FeedError):
        T.greedy_decode(model, np.array([[3, cfg.src_vocab]]))                      # unknown id
    with pytest.raises(errors.ShapeError):
        T.greedy_decode(model, np.array([3, 4]))                                    # not (batch, length)
    with pytest.raises(errors.ShapeError):
        T.beam_search(model, np.array([[3, 4]]), max_len=cfg.max_len + 1)
    with pytest.raises(errors.AttngraphError):
        T.beam_search(model, np.array([[3, 4]]), beam_size=0)
    with pytest.raises(errors.ShapeError):
        T.TransformerConfig.tiny(5, 5, d_model=30)                                   # 30 heads-size mismatch
    with pytest.raises(errors.ShapeError):
        T.TransformerConfig.tiny(5, 6, share_embeddings=True)
    with pytest.raises(errors.FeedError):
        model.compiled("step").run({"tokens": np.zeros(2, np.int64)})               # missing feeds
    state = model.incremental(np.array([[3, 4], [5, 6]]))
    with pytest.raises(errors.ShapeError):
        state.step(np.array([SOS]))                                                 # one token for two rows
    with pytest.raises(errors.DTypeError):
        state.step(np.array([1.0, 1.0]))


def test_copy_after_compiling_keeps_weights_not_executables(tiny, rng):
    cfg, model, _ = tiny
    model.compiled("logits")
    twin = model.copy()
    src, tgt = random_ids(rng, 1, 4, cfg.src_vocab), np.array([[SOS, 4, 5]])
    np.testing.assert_array_equal(twin.logits(src, tgt, backend="numpy"), model.logits(src, tgt, backend="numpy"))
    assert twin.compiled("logits") is not model.compiled("logits")


@pytest.mark.slow
def test_example_learns_to_reverse_digit_strings():
    """examples/transformer_reverse.py: 300 steps of training, then held-out strings decoded
    with the cache, greedy and beam search (~40 s on one thread of a 2-core machine)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "transformer_reverse.py"
    spec = importlib.util.spec_from_file_location("transformer_reverse", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, seen = example.train_model(300, seed=0, log=lambda msg: None)
    held_out = example.random_strings(np.random.default_rng(5), 200, exclude=seen)
    result = example.evaluate(model, held_out, beam_size=3, log=lambda msg: None)
    assert result["greedy"] >= 0.95 and result["beam"] >= 0.95, result
