"""A Transformer encoder-decoder learns to reverse digit strings; decoded with a key/value cache.

Trains a small ``ag.models.transformer.Seq2SeqTransformer`` (teacher forcing, CPU backend) on
random digit strings of 4..10 digits, decodes held-out strings with greedy search and beam
search (both from <sos> until <eos>, each step one run of the cached step graph), prints the
exact-match accuracy, writes the cross-attention of the last decoder layer as a heatmap
(an anti-diagonal: output position i reads source position n-1-i) and diagrams of the step
graph, and times one cached decoding step against one full recomputation at growing lengths.

    python examples/transformer_reverse.py --out reverse_out           # ~30 s to 1 min on one thread
    python examples/transformer_reverse.py --steps 300 --no-timing     # a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import attngraph as ag
from attngraph import train
from attngraph.models import transformer as T

TOKENS = ["<pad>", "<sos>", "<eos>"] + [str(d) for d in range(10)]
PAD, SOS, EOS, DIGIT0 = 0, 1, 2, 3
MIN_DIGITS, MAX_DIGITS = 4, 10


def make_config(**changes) -> T.TransformerConfig:
    """d=64, 4 heads, 2+2 post-norm layers, FFN 128: small enough to train in a couple of minutes."""
    base = dict(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128,
                dropout=0.0, max_len=16, bucket=8)
    return T.TransformerConfig(len(TOKENS), len(TOKENS), **{**base, **changes})


def random_strings(rng, n: int, exclude=frozenset()) -> list[str]:
    out, seen = [], set(exclude)
    while len(out) < n:
        s = "".join(rng.choice(list("0123456789"), size=rng.integers(MIN_DIGITS, MAX_DIGITS + 1)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def ids(s: str) -> list[int]:
    return [DIGIT0 + int(c) for c in s]


def text(row) -> str:
    """Ids → digits, up to the first <eos>."""
    out = []
    for t in np.asarray(row).tolist():
        if t == EOS:
            break
        out.append(TOKENS[t] if t >= DIGIT0 else "?")
    return "".join(out)


def arrays(strings) -> dict[str, np.ndarray]:
    """Feeds of the training graph: src (N, 10); tgt_in = <sos> + reversed, tgt_out = reversed + <eos> (N, 11)."""
    src = T.pad_batch([ids(s) for s in strings], PAD, length=MAX_DIGITS)
    tgt_in = T.pad_batch([[SOS] + ids(s[::-1]) for s in strings], PAD, length=MAX_DIGITS + 1)
    tgt_out = T.pad_batch([ids(s[::-1]) + [EOS] for s in strings], PAD, length=MAX_DIGITS + 1)
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def train_model(steps: int, seed: int = 0, batch: int = 64, log=print):
    """Train on fresh random strings; return the model (weights loaded back) and the training strings."""
    rng = np.random.default_rng(seed)
    model = T.Seq2SeqTransformer(make_config()).reset_parameters(seed)
    strings = random_strings(rng, steps * batch // 4)                 # each string seen ~4 times
    data = train.Batches(arrays(strings), batch, seed=seed, drop_last=True)
    epochs = max(1, -(-steps // len(data)))
    optimizer = train.AdamW(train.cosine(2e-3, epochs * len(data), warmup=100, min_lr=5e-5),
                            betas=(0.9, 0.98), weight_decay=0.01, clip_norm=1.0)
    t0 = time.perf_counter()
    step = train.compile_train_step(model.build_graph("train"), "loss", optimizer=optimizer, seed=seed)
    log(f"compiled the training step in {time.perf_counter() - t0:.1f} s; {len(strings)} strings, "
        f"{epochs} epochs of {len(data)} batches")
    history = train.fit(step, data, epochs, progress=False,
                        callbacks=[lambda s: log(f"epoch {s.epoch + 1}: loss {s.history.epoch_loss[-1]:.4f}")])
    model.load_from(step.exe)
    log(f"trained in {time.perf_counter() - t0:.0f} s, final loss {history.epoch_loss[-1]:.4f}")
    return model, set(strings)


def accuracy(result, strings) -> float:
    return float(np.mean([text(row) == s[::-1] for row, s in zip(result.tokens, strings)]))


def evaluate(model, strings, beam_size: int = 4, log=print) -> dict:
    src = T.pad_batch([ids(s) for s in strings], PAD, bucket=model.cfg.bucket)
    t0 = time.perf_counter()
    greedy = T.greedy_decode(model, src, max_len=MAX_DIGITS + 1)
    t1 = time.perf_counter()
    beam = T.beam_search(model, src, beam_size=beam_size, max_len=MAX_DIGITS + 1)
    t2 = time.perf_counter()
    out = {"greedy": accuracy(greedy, strings), "beam": accuracy(beam, strings),
           "greedy_s": t1 - t0, "beam_s": t2 - t1}
    log(f"held-out exact match: greedy {out['greedy']:.1%} ({t1 - t0:.1f} s), beam {beam_size} "
        f"{out['beam']:.1%} ({t2 - t1:.1f} s) on {len(strings)} strings")
    for s, g in list(zip(strings, greedy.tokens))[:3]:
        log(f"  {s} → {text(g)}")
    return out


def draw_attention(model, s: str, path: Path) -> Path:
    """The last decoder layer's cross-attention (mean over heads) for one string, as ag.viz draws it."""
    result = T.greedy_decode(model, np.array([ids(s)]), max_len=MAX_DIGITS + 1)
    out = text(result.tokens[0])
    tgt_in = np.array([[SOS] + list(result.tokens[0, :len(out)])])      # what the decoder read
    exe = model.compiled("logits", attention=True)
    weights = exe.run({"src": np.array([ids(s)]), "tgt_in": tgt_in})["cross_attention"][0]   # (T, S)
    ag.viz.attention_heatmap(weights, x_labels=list(s), y_labels=list(out) + ["<eos>"], path=path,
                             title=f"{s} → {out}", xlabel="source digit", ylabel="output digit")
    return path


def render_graphs(model, out: Path) -> list[Path]:
    """The step graph as written (layers expanded) and after fusion (layers collapsed)."""
    exe = model.compiled("step")
    paths = [out / "transformer_step.svg", out / "transformer_step_fused.png"]
    model.build_graph("step").render(str(paths[0]), max_depth=2)
    exe.graph.render(str(paths[1]), max_depth=1)
    return paths


def time_steps(lengths=(32, 128, 256, 512, 1024), repeat: int = 20, log=print) -> list[tuple]:
    """One cached step at position T-1 vs one full recomputation of a T-token prefix (random weights,
    d=128, 4 heads, 2+2 layers, batch 4, a 32-token source)."""
    cfg = make_config(d_model=128, dim_feedforward=512, max_len=max(lengths), bucket=32)
    model = T.Seq2SeqTransformer(cfg).reset_parameters(1)
    rng = np.random.default_rng(0)
    src = rng.integers(DIGIT0, len(TOKENS), size=(4, 32))
    rows = []
    for length in lengths:
        prefix = rng.integers(DIGIT0, len(TOKENS), size=(4, length))
        state = model.incremental(src)
        shape = (4, cfg.nhead, T.round_up(length, cfg.bucket), cfg.head_dim)    # as after T-1 steps
        state.cache = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in state.cache]
        full = model.recompute(src)
        full.prefix = prefix[:, :-1]

        def cached_step():
            state.position = length - 1
            state.step_logits(prefix[:, -1])

        def full_step():
            full.prefix = prefix[:, :-1]
            full.step_logits(prefix[:, -1])

        cached_step(), full_step()                                      # plans and buffers
        times = []
        for fn in (cached_step, full_step):                             # the median of single runs, in ms
            runs = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t0)
            times.append(float(np.median(runs)) * 1e3)
        rows.append((length, *times))
        log(f"T={length:4d}: cached step {times[0]:7.2f} ms, full recompute {times[1]:8.2f} ms "
            f"({times[1] / times[0]:.0f}x)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps (batches of 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--test", type=int, default=500, help="held-out strings")
    parser.add_argument("--out", default="reverse_out", help="folder for the pictures")
    parser.add_argument("--no-timing", action="store_true", help="skip the cached vs recomputed step timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="numba and BLAS threads (1: fastest for this small model on a small machine)")
    args = parser.parse_args()
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, seen = train_model(args.steps, args.seed)
    held_out = random_strings(np.random.default_rng(args.seed + 1000), args.test, exclude=seen)
    evaluate(model, held_out, args.beam)
    print("wrote", draw_attention(model, "3141592653", out / "transformer_attention.png"))
    print("wrote", *render_graphs(model, out))
    if not args.no_timing:
        time_steps()


if __name__ == "__main__":
    main()
