"""Read a plan file for a report, with errors that name the bad field.

:meth:`Plan.from_dict` checks the version and the top-level required fields; this adds the nested
structure a report reads (``mesh[i].size``, ``predicted.step_time_s``,
``search.alternatives[i].why``, ...) so a hand-edited or truncated file fails with the field's
path instead of a ``KeyError`` traceback.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from autopar.core.errors import PlanError
from autopar.core.plan import PLAN_VERSION, Plan, PredictedCost

INT_FIELDS = ("global_batch", "micro_batch_size", "virtual_stages", "zero_stage")
ALTERNATIVE_FIELDS = ("summary", "step_time_s", "why")
REJECTED_FIELDS = ("config", "fits", "why")


def _need(d: dict, key: str, where: str, kind: type | tuple, kind_name: str) -> Any:
    if key not in d:
        raise PlanError(f"{where} is missing the field {key!r}")
    value = d[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise PlanError(f"{where}.{key}={value!r}: must be {kind_name}")
    return value


def _check_mesh(d: dict) -> None:
    mesh = d["mesh"]
    if not isinstance(mesh, list) or not mesh:
        raise PlanError(f"plan field 'mesh'={mesh!r}: must be a non-empty list of {{name, size}}")
    for i, axis in enumerate(mesh):
        if not isinstance(axis, dict):
            raise PlanError(f"plan field mesh[{i}]={axis!r}: must be an object {{name, size}}")
        _need(axis, "name", f"plan field mesh[{i}]", str, "a string")
        _need(axis, "size", f"plan field mesh[{i}]", int, "a positive integer")


def _check_predicted(p: object) -> None:
    if p is None:
        return
    if not isinstance(p, dict):
        raise PlanError(f"plan field 'predicted' must be an object or null, got {type(p).__name__}")
    known = {f.name for f in fields(PredictedCost)}
    unknown = sorted(set(p) - known)
    if unknown:
        raise PlanError(f"plan field predicted has unknown field(s) {unknown}; known: {sorted(known)}")
    _need(p, "step_time_s", "plan field predicted", (int, float), "a number (seconds)")
    for key in ("breakdown_s", "memory_breakdown_bytes", "extra"):
        if key in p and not isinstance(p[key], dict):
            raise PlanError(f"plan field predicted.{key} must be an object, got {type(p[key]).__name__}")


def _check_entries(entries: object, where: str, required: tuple[str, ...]) -> None:
    if not isinstance(entries, list):
        raise PlanError(f"plan field {where} must be a list, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise PlanError(f"plan field {where}[{i}] must be an object")
        for key in required:
            if key not in e:
                raise PlanError(f"plan field {where}[{i}] is missing the field {key!r}")


def _check_search(s: object) -> None:
    if s is None:
        return
    if not isinstance(s, dict):
        raise PlanError(f"plan field 'search' must be an object or null, got {type(s).__name__}")
    if "alternatives" in s:
        _check_entries(s["alternatives"], "search.alternatives", ALTERNATIVE_FIELDS)
    if "rejected" in s:
        _check_entries(s["rejected"], "search.rejected", REJECTED_FIELDS)
    if "stats" in s and not isinstance(s["stats"], dict):
        raise PlanError(f"plan field search.stats must be an object, got {type(s['stats']).__name__}")


def check_plan_dict(d: object) -> None:
    """Raise PlanError naming the first missing or ill-typed field a report needs."""
    if not isinstance(d, dict):
        raise PlanError(f"a plan must be a JSON object, got {type(d).__name__}")
    if "version" not in d:
        raise PlanError(f"plan is missing the field 'version' (this autopar writes version {PLAN_VERSION})")
    if d["version"] != PLAN_VERSION:
        raise PlanError(
            f"plan field version={d['version']!r} is not supported (this autopar reads version "
            f"{PLAN_VERSION}); re-create the plan with `autopar plan`"
        )
    for key in ("mesh", *INT_FIELDS[:2]):
        if key not in d:
            raise PlanError(f"plan is missing the field {key!r}")
    _check_mesh(d)
    for key in INT_FIELDS:
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], int)):
            raise PlanError(f"plan field {key}={d[key]!r}: must be an integer")
    stages = d.get("layer_stages")
    if stages is not None and not (isinstance(stages, list) and all(isinstance(x, int) for x in stages)):
        raise PlanError("plan field layer_stages must be null or a list of integers (one stage per block)")
    if not isinstance(d.get("placements", {}), dict):
        raise PlanError("plan field placements must be an object {node name: placement}")
    _check_predicted(d.get("predicted"))
    _check_search(d.get("search"))


def plan_from_text(text: str, where: str = "plan") -> Plan:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{where}: not valid JSON ({e})") from None
    try:
        check_plan_dict(d)
        return Plan.from_dict(d)
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None


def load_plan(path: str | Path) -> Plan:
    """A plan file written by ``autopar plan --out`` (or ``Plan.to_json``)."""
    path = Path(path)
    if path.is_dir():
        raise PlanError(
            f"the plan file {str(path)!r} is a directory; give the .json file `autopar plan --out` wrote"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PlanError(f"cannot read the plan file {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise PlanError(
            f"the plan file {str(path)!r} is not text (byte 0x{e.object[e.start]:02x} at offset {e.start} "
            "is not UTF-8); give the JSON file `autopar plan --out` wrote"
        ) from None
    return plan_from_text(text, str(path))
