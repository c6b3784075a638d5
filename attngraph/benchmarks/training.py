"""The training suite: one training step (forward + backward + AdamW) of the benchmark models,
and the attention backward alone, against torch eager with the same weights and optimizer.

- ``training_suite()`` → (markdown, raw rows), as the suites of suites.py; registered in
  report.py as ``"training"``.
- Steps: the 4-layer encoder (T=128, loss = mean of the outputs squared) and ViT-Tiny (loss =
  cross-entropy of the logits against int labels), batch 1 and 32. attngraph:
  ``train.compile_train_step(..., optimizer=AdamW(1e-4), backend="cpu")``; torch: the same
  module in train mode (dropout 0), ``torch.optim.AdamW(lr=1e-4)``, zero_grad / backward / step.
  Both start from the same weights and take the same steps, so their losses stay equal (the
  "loss diff" column: the largest difference over every timed step, each engine's n-th step).
- Attention backward (B, H, T, D): attngraph's ``attention_grad`` node on the cpu backend (it
  recomputes the forward's output and log-sum-exp, then runs the flash backward), the flash
  backward kernel alone given them, and torch SDPA's backward alone (``torch.autograd.grad``
  of a retained graph).
"""

from __future__ import annotations

import math

import numpy as np

import attngraph as ag

from .harness import interleaved, markdown_table

__all__ = ["training_suite", "attention_backward_rows", "training_step_rows"]

ATTENTION_BACKWARD_SHAPES = [((8, 4, 128, 64), False), ((8, 4, 128, 64), True), ((1, 8, 1024, 64), False),
                             ((1, 8, 1024, 64), True)]


def _train_graph(name, weights):
    from ..train import losses
    from . import models as M

    if name == "encoder":
        g = M.attngraph_encoder(weights)
        y = g.tensor(g.outputs["y"])
        g.output("loss", ag.mean(y * y))
    else:
        g = M.attngraph_vit(weights)
        logits = g.tensor(g.outputs["logits"])
        labels = g.input("labels", ("B",), "int64")
        g.output("loss", losses.cross_entropy(logits, labels))
    return g


def training_step_rows(repeats: int = 5, batches=(1, 32), lr: float = 1e-4):
    import torch

    from ..train import AdamW, compile_train_step
    from . import models as M

    rows, raw = [], []
    rng = np.random.default_rng(0)
    for name in ("encoder", "vit_tiny"):
        for batch in batches:
            module = (M.torch_encoder() if name == "encoder" else M.torch_vit()).train()
            weights = M.state_dict_numpy(module)
            step = compile_train_step(_train_graph(name, weights), "loss", optimizer=AdamW(lr), backend="cpu")
            opt = torch.optim.AdamW(module.parameters(), lr=lr)
            if name == "encoder":
                x = rng.standard_normal((batch, M.ENCODER["seq"], M.ENCODER["d"])).astype(np.float32)
                feeds = {"x": x}
                tx = torch.from_numpy(x)

                def torch_loss():
                    y = module(tx)
                    return (y * y).mean()
            else:
                images = rng.standard_normal((batch, 3, M.VIT_TINY["image"], M.VIT_TINY["image"])).astype(np.float32)
                labels = rng.integers(0, M.VIT_TINY["classes"], batch).astype(np.int64)
                feeds = {"images": images, "labels": labels}
                ti, tl = torch.from_numpy(images), torch.from_numpy(labels)

                def torch_loss():
                    return torch.nn.functional.cross_entropy(module(ti), tl)

            losses_ag, losses_torch = [], []

            def run_attngraph():
                losses_ag.append(step(feeds))

            def run_torch():
                opt.zero_grad(set_to_none=True)
                loss = torch_loss()
                loss.backward()
                opt.step()
                losses_torch.append(loss.item())

            t = interleaved({"attngraph": run_attngraph, "torch": run_torch}, repeats=repeats, warmup=2)
            ms = {k: t[k].median for k in t}
            n = min(len(losses_ag), len(losses_torch))
            diff = float(np.max(np.abs(np.subtract(losses_ag[:n], losses_torch[:n])))) if n else float("nan")
            rows.append([name, batch, ms["attngraph"], ms["torch"], ms["attngraph"] / ms["torch"], f"{diff:.1e}"])
            raw.append({"model": name, "batch": batch, "ms": ms, "loss_diff": diff, "steps": n})
    header = ["model", "batch", "attngraph ms", "torch eager ms", "vs torch", "loss diff"]
    return markdown_table(header, rows), raw


def _attention_grad_exe(shape, causal):
    from ..dsl import apply

    g = ag.Graph("attention_backward")
    D = shape[-1]
    q, k, v, do = (g.input(n, shape) for n in ("q", "k", "v", "g"))
    attrs = {"scale": 1 / math.sqrt(D), "causal": causal, "has_bias": False, "has_mask": False}
    for name, t in zip(("dq", "dk", "dv"), apply("attention_grad", [q, k, v, do], **attrs)):
        g.output(name, t)
    return ag.compile(g, backend="cpu")


def attention_backward_rows(repeats: int = 7, shapes=ATTENTION_BACKWARD_SHAPES):
    import torch
    import torch.nn.functional as F

    from ..backends.numba_cpu.attention_kernels import attention_backward, attention_forward

    rows, raw = [], []
    rng = np.random.default_rng(0)
    for shape, causal in shapes:
        q, k, v, do = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
        feeds = {"q": q, "k": k, "v": v, "g": do}
        exe = _attention_grad_exe(shape, causal)
        scale = 1 / math.sqrt(shape[-1])
        out, lse = attention_forward(q, k, v, scale=scale, causal=causal, return_lse=True)
        tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
        tout = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        tdo = torch.from_numpy(do)
        fns = {
            "attngraph": lambda: exe.run(feeds),
            "kernel": lambda: attention_backward(q, k, v, out, lse, do, scale=scale, causal=causal),
            "torch": lambda: torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True),
        }
        got = exe.run(feeds)
        want = fns["torch"]()
        err = max(float(np.abs(got[n] - w.numpy()).max()) for n, w in zip(("dq", "dk", "dv"), want))
        t = interleaved(fns, repeats=repeats, warmup=2)
        ms = {k_: t[k_].median for k_ in fns}
        rows.append([f"{shape}", "causal" if causal else "", ms["attngraph"], ms["kernel"], ms["torch"],
                     ms["attngraph"] / ms["torch"], ms["kernel"] / ms["torch"], f"{err:.1e}"])
        raw.append({"shape": shape, "causal": causal, "ms": ms, "max_abs_err": err})
    header = ["(B, H, T, D)", "mask", "attngraph attention_grad ms", "flash bwd kernel alone ms",
              "torch SDPA bwd ms", "node vs torch", "kernel vs torch", "max |err| vs torch"]
    return markdown_table(header, rows), raw


def training_suite(repeats: int = 5):
    step_table, step_raw = training_step_rows(repeats=repeats)
    attn_table, attn_raw = attention_backward_rows()
    text = (
        "Caveat: in one process, torch's CPU times come out far slower than in a process without numba\n"
        "(e.g. SDPA backward (8, 4, 128, 64) 244 ms vs 13 ms torch-only, 2026-11-25), most likely the two\n"
        "thread pools contending for the cores: check the torch columns against a torch-only process.\n\n"
        "One training step (forward + backward + AdamW, float32), median ms; torch eager trains the same\n"
        "module from the same weights with torch.optim.AdamW. Encoder: loss = mean(y²), T = 128;\n"
        "ViT-Tiny: cross-entropy of the logits.\n\n" + step_table + "\n\n"
        "Attention backward alone, float32. \"attngraph attention_grad\" is the node autodiff emits, run\n"
        "on the cpu backend: it recomputes the forward (output and log-sum-exp) and runs the flash\n"
        "backward; \"kernel alone\" is the flash backward given them; torch is SDPA's backward\n"
        "(torch.autograd.grad of a retained graph).\n\n" + attn_table)
    return text, {"steps": step_raw, "attention_backward": attn_raw}
