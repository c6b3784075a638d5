"""The op reference (docs/ops.md), generated from the registry so it never drifts."""

from __future__ import annotations

import inspect

from .ir import all_ops

__all__ = ["op_reference_markdown"]


def op_reference_markdown() -> str:
    ops = all_ops()
    families: dict[str, list] = {}
    for op in ops:
        families.setdefault(op.family or "other", []).append(op)
    lines = [
        "# Op reference",
        "",
        "Generated from the op registry by `python -m attngraph.op_reference > docs/ops.md`; "
        "a test fails when this page is stale.",
        "",
        f"{len(ops)} ops in {len(families)} families. Each op is one `OpDef` record in `ops/<family>.py` "
        "(shape rule, numpy reference, fusion class; gradient and kernels as they land).",
        "",
        "| family | ops |",
        "|---|---|",
    ]
    for fam, members in sorted(families.items()):
        lines.append(f"| {fam} | {', '.join(f'`{op.name}`' for op in members)} |")
    for fam, members in sorted(families.items()):
        lines += ["", f"## {fam}", ""]
        lines += ["| op | attributes | fusion | grad | cpu | cuda | meaning |", "|---|---|---|---|---|---|---|"]
        for op in members:
            params = list(inspect.signature(op.infer).parameters.values())
            attrs = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
            mark = lambda slot: "✓" if slot is not None else ""  # noqa: E731
            doc = op.doc.replace("|", "\\|")
            lines.append(f"| `{op.name}` | {', '.join(attrs) or '–'} | {op.fusion.value} | {mark(op.grad)} | "
                         f"{mark(op.cpu)} | {mark(op.cuda)} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import attngraph  # noqa: F401  (registers the ops)

    print(op_reference_markdown(), end="")
