"""The benchmark suites. Each returns a markdown section (and its raw rows)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

import attngraph as ag

from .harness import interleaved, markdown_table

ATTENTION_SHAPES = [
    ((1, 12, 197, 64), False), ((8, 4, 128, 64), False), ((8, 4, 128, 64), True),
    ((1, 8, 1024, 64), False), ((1, 8, 1024, 64), True), ((1, 8, 4096, 64), False), ((1, 8, 4096, 64), True),
    ((32, 3, 65, 64), False),
]


def attention_graph(shape, causal: bool) -> ag.Graph:
    """Attention as a user writes it: matmul, scale, mask, softmax, matmul (the optimizer fuses it)."""
    _, H, T, D = shape
    g = ag.Graph("attention")
    q, k, v = (g.input(n, ("B", H, T, D)) for n in "qkv")
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D)
    if causal:
        s = ag.mask(s, ag.causal_mask(g, T))
    g.output("o", ag.softmax(s, axis=-1) @ v)
    return g


def _onnx_attention(shape, causal, tmp):
    import onnxruntime as ort
    import torch

    D, T = shape[-1], shape[-2]

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(D))
            if causal:
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            return torch.matmul(torch.softmax(s, dim=-1), v)

    path = os.path.join(tmp, f"attention_{'x'.join(map(str, shape))}_{int(causal)}.onnx")
    example = tuple(torch.zeros(shape) for _ in range(3))
    torch.onnx.export(Attention(), example, path, dynamo=False, opset_version=17, input_names=["q", "k", "v"],
                      output_names=["o"])
    return _ort_session(path)


def _ort_session(path, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool spins after each run as OpenMP's does; the engines take turns in one process,
    # so every engine waits passively (attngraph and torch through OMP_WAIT_POLICY)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def attention_suite(repeats: int = 7, shapes=ATTENTION_SHAPES, include_numpy: bool = True):
    import torch
    import torch.nn.functional as F

    rows, raw = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for shape, causal in shapes:
            q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
            feeds = {"q": q, "k": k, "v": v}
            g = attention_graph(shape, causal)
            cpu = ag.compile(g, backend="cpu")
            assert cpu.graph.op_counts().get("attention") == 1
            ref = ag.compile(g, backend="numpy")
            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
            sess = _onnx_attention(shape, causal, tmp)
            fns = {
                "attngraph": lambda: cpu.run(feeds),
                "torch_sdpa": lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal),
                "onnxruntime": lambda: sess.run(None, feeds),
            }
            big = shape[2] >= 4096
            if include_numpy:
                fns["numpy"] = lambda: ref.run(feeds)
            got = cpu.run(feeds)["o"]
            want = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).numpy()
            err = float(np.abs(got - want).max())
            t = interleaved(fns, repeats=3 if big else repeats, warmup=1)
            ms = {name: t[name].median for name in fns}
            best_peer = min(ms["torch_sdpa"], ms["onnxruntime"])
            rows.append([f"{shape}", "causal" if causal else "", ms["attngraph"], ms["torch_sdpa"], ms["onnxruntime"],
                         ms.get("numpy", float("nan")), ms["attngraph"] / best_peer,
                         ms.get("numpy", float("nan")) / ms["attngraph"], f"{err:.1e}"])
            raw.append({"shape": shape, "causal": causal, "ms": ms, "max_abs_err": err})
    header = ["(B, H, T, D)", "mask", "attngraph ms", "torch SDPA ms", "ORT ms", "numpy ms",
              "vs fastest peer", "numpy / attngraph", "max |err| vs torch"]
    return markdown_table(header, rows), raw


def model_suite(repeats: int = 7, batches=(1, 32)):
    import torch

    from . import models as M

    rows, raw = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("encoder", "vit_tiny"):
            module = M.torch_encoder() if name == "encoder" else M.torch_vit()
            weights = M.state_dict_numpy(module)
            graph = M.attngraph_encoder(weights) if name == "encoder" else M.attngraph_vit(weights)
            cpu = ag.compile(graph, backend="cpu")
            input_name = next(iter(graph.inputs))
            for batch in batches:
                shape = (batch, M.ENCODER["seq"], M.ENCODER["d"]) if name == "encoder" else (
                    batch, 3, M.VIT_TINY["image"], M.VIT_TINY["image"])
                x = rng.standard_normal(shape).astype(np.float32)
                tx = torch.from_numpy(x)
                path = os.path.join(tmp, f"{name}_{batch}.onnx")
                # Exported with autograd on: under no_grad torch's encoder takes its fused fast path,
                # which has no ONNX export.
                torch.onnx.export(module, (tx,), path, dynamo=False, opset_version=17,
                                  input_names=[input_name], output_names=["out"])
                sess = _ort_session(path)

                def run_torch():
                    with torch.inference_mode():
                        return module(tx)

                fns = {"attngraph": lambda: cpu.run({input_name: x}), "torch": run_torch,
                       "onnxruntime": lambda: sess.run(None, {input_name: x})}
                want = run_torch().numpy()
                err = float(np.abs(next(iter(cpu.run({input_name: x}).values())) - want).max())
                t = interleaved(fns, repeats=repeats, warmup=2)
                ms = {k: t[k].median for k in fns}
                rows.append([name, batch, ms["attngraph"], ms["torch"], ms["onnxruntime"],
                             ms["attngraph"] / ms["onnxruntime"], ms["attngraph"] / ms["torch"], f"{err:.1e}"])
                raw.append({"model": name, "batch": batch, "ms": ms, "max_abs_err": err})
    header = ["model", "batch", "attngraph ms", "torch eager ms", "ORT ms", "vs ORT", "vs torch", "max |err|"]
    return markdown_table(header, rows), raw


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import numpy as np
    import attngraph as ag
    from attngraph.benchmarks import models as M
    t_import = time.perf_counter() - t0
    module_free = {k: np.asarray(v) for k, v in np.load(sys.argv[1]).items()}
    g = M.attngraph_encoder(module_free)
    t1 = time.perf_counter()
    exe = ag.compile(g, backend="cpu")
    t2 = time.perf_counter()
    exe.run({"x": np.zeros((1, 128, 256), np.float32)})
    t3 = time.perf_counter()
    print(json.dumps({"import_s": t_import, "compile_s": t2 - t1, "first_run_s": t3 - t2}))
""")


def compile_suite():
    """Cold (empty caches) and warm compile + first run of the 4-layer encoder, each in a fresh process."""
    from . import models as M

    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        weights = M.state_dict_numpy(M.torch_encoder())
        np.savez(os.path.join(tmp, "w.npz"), **weights)
        script = os.path.join(tmp, "compile.py")
        with open(script, "w") as f:
            f.write(_COMPILE_SCRIPT)
        env = dict(os.environ, ATTNGRAPH_CACHE_DIR=os.path.join(tmp, "cache"),
                   NUMBA_CACHE_DIR=os.path.join(tmp, "numba"))
        for label in ("cold (empty caches)", "warm (second process)"):
            out = subprocess.run([sys.executable, script, os.path.join(tmp, "w.npz")], env=env, capture_output=True,
                                 text=True, timeout=600)
            if out.returncode:
                raise RuntimeError(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append([label, r["import_s"], r["compile_s"], r["first_run_s"], r["compile_s"] + r["first_run_s"]])
            raw.append(dict(r, label=label))
    header = ["4-layer encoder", "import s", "compile s", "first run s", "compile + first run s"]
    return markdown_table(header, rows), raw


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, math, sys
    import numpy as np
    import attngraph as ag
    from attngraph.benchmarks.suites import attention_graph

    def rss_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    T, causal = int(sys.argv[1]), sys.argv[2] == "1"
    shape = (1, 8, T, 64)
    exe = ag.compile(attention_graph(shape, causal), backend="cpu")
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in "qkv"}
    exe.run(feeds)                          # compile, plan and allocate the buffers once
    reset_peak()
    before = rss_kib("VmRSS")
    out = exe.run(feeds)
    peak = rss_kib("VmHWM")
    print(json.dumps({"extra_mib": (peak - before) / 1024, "output_mib": out["o"].nbytes / 2**20,
                      "scores_mib": 8 * T * T * 4 / 2**20}))
""")


def memory_suite(lengths=(4096, 16384)):
    """Peak resident memory added by one run of a compiled attention graph (fresh process per case),
    next to the size of the T×T score matrix that an unfused implementation materialises."""
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "memory.py")
        with open(script, "w") as f:
            f.write(_MEMORY_SCRIPT)
        for T in lengths:
            for causal in (False, True):
                out = subprocess.run([sys.executable, script, str(T), str(int(causal))], capture_output=True,
                                     text=True, timeout=900)
                if out.returncode:
                    raise RuntimeError(out.stderr)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append([f"(1, 8, {T}, 64)", "causal" if causal else "", r["extra_mib"], r["output_mib"],
                             r["scores_mib"]])
                raw.append(dict(r, T=T, causal=causal))
    header = ["(B, H, T, D)", "mask", "peak extra MiB (run, incl. returned output)", "output MiB",
              "T×T scores would be MiB"]
    return markdown_table(header, rows), raw
