"""``autopar models``: the built-in model presets and the model spec forms."""

from __future__ import annotations

import json
import sys

ORDER = 90

SPEC_FORMS = (
    "gpt:hidden=H,layers=L,heads=A,vocab=V,seq=S[,ffn=F,kv_heads=K,norm=layernorm|rmsnorm,act=gelu|swiglu]",
    "PRESET                 a named preset from the list above",
    "path/to/file.py:factory  your own model: factory() returns the model (see docs/cli.md)",
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="list built-in model presets and model spec forms",
        description="List the built-in model presets that MODEL arguments accept, and the other spec forms.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _rows(models) -> list[tuple[str, str]]:
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


def _describe(info) -> str:
    if isinstance(info, str):
        return info
    if isinstance(info, dict):
        return ", ".join(f"{k}={v}" for k, v in info.items() if v is not None)
    for attr in ("description", "summary"):
        if isinstance(getattr(info, attr, None), str):
            return getattr(info, attr)
    return str(info)


def run(args) -> int:
    try:
        from autopar.models import list_models
    except ImportError as e:
        print(f"autopar models: the model zoo is not available in this build ({e})", file=sys.stderr)
        return 1
    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2, default=str))
        return 0
    rows = _rows(models)
    width = max((len(n) for n, _ in rows), default=0)
    print("Built-in models")
    for name, desc in rows:
        print(f"  {name.ljust(width)}  {desc}".rstrip())
    print("\nMODEL spec forms")
    for form in SPEC_FORMS:
        print(f"  {form}")
    return 0
