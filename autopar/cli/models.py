"""``autopar models``: the built-in model presets and the model spec forms."""

from __future__ import annotations

import argparse
import json
import sys

ORDER = 90

SPEC_FORMS = (
    "gpt:hidden=H,layers=L,heads=A,vocab=V,seq=S[,ffn=F,kv_heads=K,norm=layernorm|rmsnorm,act=gelu|swiglu|gelu_tanh]",
    "PRESET                    a preset above (gpt:175b = gpt3-175b)",
    "PRESET:layers=2,dropout=0 a preset with GPTConfig fields overridden",
    "path/to/file.py:factory   your own model: factory() returns a model, (model, example_inputs, loss_fn)",
    "                          or a dict with those keys (see docs/cli.md)",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list built-in model presets and model spec forms",
        description="List the built-in model presets that MODEL arguments accept, and the other spec forms.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _rows(models: dict[str, object] | list[object]) -> list[tuple[str, str]]:
    """Accept what ``list_models()`` returns: a mapping name -> info, or a list of names/dicts."""
    if isinstance(models, dict):
        return [(str(k), _describe(v)) for k, v in models.items()]
    rows = []
    for m in models:
        if isinstance(m, str):
            rows.append((m, ""))
        elif isinstance(m, dict):
            rows.append((str(m.get("name", "?")), _describe({k: v for k, v in m.items() if k != "name"})))
        else:
            rows.append((str(getattr(m, "name", m)), _describe(m)))
    return rows


def _table(models: dict[str, dict]) -> str:
    """One row per model; columns from the first entry (``source`` left out, ``description`` last)."""
    first = next(iter(models.values()))
    cols = [k for k in first if k not in ("source", "description")]
    cols += ["description"] if "description" in first else []
    header = ["model", *cols]
    rows = [
        [name, *("-" if info.get(c) is None else str(info.get(c)) for c in cols)]
        for name, info in models.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _describe(info: object) -> str:
    if isinstance(info, str):
        return info
    if isinstance(info, dict):
        return ", ".join(f"{k}={v}" for k, v in info.items() if v is not None)
    for attr in ("description", "summary"):
        if isinstance(getattr(info, attr, None), str):
            return getattr(info, attr)
    return str(info)


def run(args: argparse.Namespace) -> int:
    try:
        from autopar.models import list_models
    except ImportError as e:
        print(f"autopar models: the model zoo is not available in this build ({e})", file=sys.stderr)
        return 1
    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2, default=str))
        return 0
    print("Built-in models")
    if isinstance(models, dict) and models and all(isinstance(v, dict) for v in models.values()):
        print(_table(models))
    else:
        rows = _rows(models)
        width = max((len(n) for n, _ in rows), default=0)
        for name, desc in rows:
            print(f"  {name.ljust(width)}  {desc}".rstrip())
    print("\nMODEL spec forms")
    for form in SPEC_FORMS:
        print(f"  {form}")
    return 0
