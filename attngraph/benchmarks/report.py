"""Run the suites and write docs/benchmarks.md (sections are replaced one by one, so a partial
run keeps the other sections' last results)."""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

from .harness import machine_line, set_threads

SUITES = ("attention", "memory", "models", "compile", "training")
INTRO = """# Benchmarks

Measured by `attngraph bench` (or `python bench/run_all.py`) on the 2-core machine the
project is developed on. Every engine gets 2 threads (numba, BLAS via threadpoolctl,
torch, ONNX Runtime intra-op); each cell is the median of interleaved repeats in one
process, so ratios compare runs made under the same load. ONNX files are exported from
the same torch modules with `torch.onnx.export(..., dynamo=False, opset_version=17)`.
attngraph runs the graph as a user writes it (matmul, scale, mask, softmax, matmul;
or the whole model from primitives), compiled with `backend="cpu"`, so every number
includes the optimizer's fusion and the executor's per-run work (feed checks, output copy).
"""

TITLES = {
    "attention": "Attention (B, H, T, D), float32",
    "memory": "Attention peak extra memory",
    "models": "Whole models, inference, float32",
    "compile": "Compile time",
    "training": "Training step and attention backward, float32",
}


def run_suite(name: str) -> str:
    from . import suites

    if name == "attention":
        table, raw = suites.attention_suite()
    elif name == "models":
        table, raw = suites.model_suite()
    elif name == "compile":
        table, raw = suites.compile_suite()
    elif name == "memory":
        table, raw = suites.memory_suite()
    elif name == "training":
        from .training import training_suite

        table, raw = training_suite()
    else:
        raise SystemExit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    stamp = datetime.date.today().isoformat()
    return f"## {TITLES[name]}\n\n_{stamp}; {machine_line()}_\n\n{table}\n\n<!-- raw: {json.dumps(raw)} -->\n"


def write_section(path: Path, name: str, body: str) -> None:
    text = path.read_text() if path.exists() else INTRO
    marker_start, marker_end = f"<!-- suite:{name} -->", f"<!-- /suite:{name} -->"
    block = f"{marker_start}\n{body}{marker_end}"
    if marker_start in text:
        text = re.sub(re.escape(marker_start) + r".*?" + re.escape(marker_end), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="attngraph bench", description="run the benchmarks")
    parser.add_argument("suites", nargs="*", default=list(SUITES), help=f"any of {', '.join(SUITES)}")
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown file to update")
    args = parser.parse_args(argv)
    # numba's and torch's OpenMP runtimes each keep their threads spinning after a parallel
    # region; on 2 cores the spinning pool starves the other engine. Passive waiting makes the
    # in-process comparison fair (set before either runtime starts).
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    set_threads(2)
    out = Path(args.out)
    for name in args.suites:
        print(f"running {name} ...", flush=True)
        body = run_suite(name)
        print(body)
        write_section(out, name, body)
    print(f"wrote {out}")
