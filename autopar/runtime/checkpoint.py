"""Checkpoints: the full training state written with torch.distributed.checkpoint (DCP), atomically,
and read back under any plan and any world size.

Layout of a checkpoint root (``compiled.save(root)``)::

    root/step-00000003/            a complete checkpoint (it has manifest.json)
        __0_0.distcp  __1_0.distcp ...   DCP shard files, written by the ranks in parallel
        .metadata                        DCP's index
        manifest.json                    written last: format, version, plan, step, model
                                         names/shapes/dtypes, tensors, sha256 and size per file
    root/step-00000006.partial/    a save that did not finish (never loaded)

**The state is keyed by full names.** Every rank gathers the full (unsharded) state: parameters,
buffers, optimizer state (``model/<key>``, ``optim/<key>/<state key>``) and the CPU RNG state.
DCP sees each key on every rank and its planner assigns each key to one rank, balancing bytes
(``dedup_save_plans``), so the ranks write disjoint shares in parallel. On load each rank reads the
full tensors through DCP and keeps its own shards (:func:`autopar.runtime.state.scatter_full`).
This *load-full-then-scatter* makes any plan -> any plan correct by construction (tp chunks,
pipeline splits, FSDP and ZeRO-1 rows are not all DTensors, so DCP's own resharding cannot
describe them) and keeps the bits exact; the cost is that each rank holds the full state while
saving and loading (see docs/checkpoints.md).

**Atomic** means: the files are written into ``step-N.partial``; after every rank has written and
the shard hashes are collected, rank 0 writes ``manifest.json`` (temp file + ``os.replace``) and
renames the directory to ``step-N`` (one ``rename``). A crash at any point leaves either the
complete ``step-N`` or a ``.partial`` directory, which :func:`resolve` skips (with a warning) and
:func:`load_checkpoint` refuses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autopar.core.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "autopar-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = ".partial"
_NAME = re.compile(r"^step-(\d+)(\.partial)?$")


@dataclass(frozen=True)
class CheckpointInfo:
    """One entry of a checkpoint root."""

    path: Path
    step: int
    complete: bool
    reason: str = ""
    """Why it is incomplete (empty when complete)."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[CheckpointInfo]:
    """Every checkpoint under ``root``, oldest first; partial ones marked with the reason."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        m = _NAME.match(entry.name)
        if not m or not entry.is_dir():
            continue
        if m.group(2):
            out.append(CheckpointInfo(entry, int(m.group(1)), False, "a save did not finish (.partial)"))
        elif not (entry / MANIFEST).is_file():
            out.append(CheckpointInfo(entry, int(m.group(1)), False, f"no {MANIFEST}"))
        else:
            out.append(CheckpointInfo(entry, int(m.group(1)), True))
    return sorted(out, key=lambda c: (c.step, c.complete))


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint ``path`` names: itself if it holds a manifest, else the newest complete
    checkpoint under it (incomplete newer ones are skipped with a warning)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    m = _NAME.match(path.name)
    if m and path.is_dir():
        why = "a save did not finish (.partial)" if m.group(2) else f"it has no {MANIFEST}"
        raise CheckpointError(f"checkpoint {path} is incomplete: {why}; load an earlier, complete one")
    found = list_checkpoints(path)
    complete = [c for c in found if c.complete]
    if not complete:
        what = "does not exist" if not path.exists() else f"holds no complete checkpoint ({MANIFEST})"
        raise CheckpointError(f"checkpoint {path} {what}; pass a directory written by compiled.save()")
    best = complete[-1]
    for c in found:
        if not c.complete and c.step >= best.step:
            log.warning("skipping incomplete checkpoint %s (%s); loading %s", c.path, c.reason, best.path)
    return best.path


# ------------------------------------------------------------------------------------ flat state
def flatten(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a full state (``ParallelModule.full_state_dict()``) under flat keys, and the
    rest (plain JSON data) for the manifest."""
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in state["model"].items()}
    scalars: dict[str, Any] = {}
    for name, entry in state["optim"]["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = value
            else:
                scalars[f"optim/{name}/{key}"] = value
    for name, value in state.get("rng", {}).items():
        tensors[f"rng/{name}"] = value
    meta = {k: state[k] for k in ("step", "samples_seen", "seed") if k in state}
    meta["param_groups"] = state["optim"]["param_groups"]
    meta["scalars"] = scalars
    meta["extra"] = state.get("extra", {})
    return tensors, meta


def unflatten(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "model": {},
        "optim": {"state": {}, "param_groups": meta["param_groups"]},
        "rng": {},
    }
    items = list(tensors.items()) + list(meta.get("scalars", {}).items())
    for flat, value in items:
        kind, _, rest = flat.partition("/")
        if kind == "model":
            state["model"][rest] = value
        elif kind == "optim":
            name, _, key = rest.rpartition("/")
            state["optim"]["state"].setdefault(name, {})[key] = value
        elif kind == "rng":
            state["rng"][rest] = value
    for k in ("step", "samples_seen", "seed", "extra"):
        if k in meta:
            state[k] = meta[k]
    return state


def describe_tensor(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


# ------------------------------------------------------------------------------------ files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any) -> list[Any]:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    parts: list = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def hash_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {bytes, sha256}}`` of the files, each rank hashing every world-th one (collective)."""
    rank, world = _rank_world()
    mine = {
        n: {"bytes": (directory / n).stat().st_size, "sha256": _sha256(directory / n)}
        for n in names[rank::world]
    }
    out: dict[str, dict[str, Any]] = {}
    for part in _all_gather(mine):
        out.update(part)
    return {n: out[n] for n in names}


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns that it "assumes" one process when there is no process group; for a 1-rank plan
    run in-process that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------ save
def save_checkpoint(
    root: str | os.PathLike,
    state: dict[str, Any],
    info: dict[str, Any],
    *,
    keep: int | None = None,
) -> Path:
    """Write ``state`` (a full state, the same on every rank) as ``root/step-N`` (collective).

    ``info`` goes into the manifest (plan, world size, model names...). ``keep``: keep only the
    newest ``keep`` complete checkpoints (and drop partial saves older than the newest)."""
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep={keep}: keep at least the checkpoint just written (keep >= 1) or None")
    import torch.distributed.checkpoint as dcp

    rank, _ = _rank_world()
    final = step_dir(root, int(state["step"]))
    tmp = final.with_name(final.name + PARTIAL)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save of this step
        tmp.mkdir(parents=True)
    _barrier()
    tensors, meta = flatten(state)
    t0 = time.perf_counter()
    writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
    with _single_process_ok():
        dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())
    _barrier()  # every rank's files are on disk before anyone lists them
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    files = hash_files(tmp, names)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **info,
        **meta,
        "tensors": {k: describe_tensor(v) for k, v in tensors.items()},
        "files": files,
        "torch": torch.__version__,
        "save_time_s": time.perf_counter() - t0,
    }
    if rank == 0:
        _publish(tmp, final, manifest)
        if keep is not None:
            prune(root, keep)
    _barrier()
    return final


def _publish(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """The commit point: the manifest, then one rename of the directory."""
    part = tmp / (MANIFEST + ".tmp")
    with open(part, "w") as f:
        json.dump(manifest, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, tmp / MANIFEST)
    old = final.with_name(final.name + ".old")
    if final.exists():  # the same step saved again: swap, then drop the old one
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and partial saves older than the
    newest complete one; returns what was deleted."""
    found = list_checkpoints(root)
    complete = [c for c in found if c.complete]
    newest = complete[-1].step if complete else -1
    doomed = [c.path for c in complete[:-keep]] + [
        c.path for c in found if not c.complete and c.step < newest
    ]
    for path in doomed:
        log.info("removing old checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------ load
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path``, its format and version checked."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist: {path} is not a complete checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read as JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an autopar checkpoint manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format version {manifest.get('version')!r}; this autopar reads version "
            f"{FORMAT_VERSION}: load it with the autopar that wrote it, or convert it"
        )
    return manifest


def check_model(
    manifest: dict[str, Any], model_state: dict[str, torch.Tensor], where: str, *, dtypes: bool = True
) -> None:
    """The checkpoint's model has exactly this model's state keys, shapes and (``dtypes``) dtypes."""
    saved = manifest.get("model", {})
    mine = {k: describe_tensor(v) for k, v in model_state.items()}
    if not dtypes:
        saved = {k: {**d, "dtype": "any"} for k, d in saved.items()}
        mine = {k: {**d, "dtype": "any"} for k, d in mine.items()}
    missing = [k for k in mine if k not in saved]
    extra = [k for k in saved if k not in mine]
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {where} is of another model: "
            + "; ".join(
                s
                for s in (
                    f"it lacks {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
                    if missing
                    else "",
                    f"it has {extra[0]!r} which this model has not"
                    + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
                    if extra
                    else "",
                )
                if s
            )
        )
    for key, desc in mine.items():
        if saved[key] != desc:
            raise CheckpointError(
                f"checkpoint {where} is of another model: {key!r} is {saved[key]['dtype']} "
                f"{saved[key]['shape']} there but {desc['dtype']} {desc['shape']} here"
            )


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file of the manifest is there with its size and sha256 (each rank checks a share; the
    same error is raised on every rank)."""
    rank, world = _rank_world()
    names = sorted(manifest["files"])
    problems = []
    for name in names[rank::world]:
        want, file = manifest["files"][name], path / name
        if not file.is_file():
            problems.append(f"shard file {file} is missing")
        elif file.stat().st_size != want["bytes"]:
            problems.append(
                f"shard file {file} has {file.stat().st_size} bytes, expected {want['bytes']} (truncated?)"
            )
        elif _sha256(file) != want["sha256"]:
            problems.append(f"shard file {file} does not match its sha256 in {MANIFEST} (corrupted)")
    everyone = [p for part in _all_gather(problems) for p in part]
    if everyone:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {everyone[0]}"
            + (f" (+{len(everyone) - 1} more)" if len(everyone) > 1 else "")
        )


def load_checkpoint(
    path: str | os.PathLike, model_state: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(full state, manifest)`` of the checkpoint ``path`` names (see :func:`resolve`), checked
    against ``model_state`` (this model's names/shapes/dtypes) and the shard hashes before anything
    is read into the model (collective)."""
    import torch.distributed.checkpoint as dcp

    where = resolve(path)
    manifest = read_manifest(where)
    check_model(manifest, model_state, str(where))
    verify_files(where, manifest)
    dtypes = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
    tensors = {k: torch.empty(d["shape"], dtype=dtypes[d["dtype"]]) for k, d in manifest["tensors"].items()}
    try:
        with _single_process_ok():
            reader = dcp.FileSystemReader(str(where))
            dcp.load(tensors, storage_reader=reader, no_dist=not dist.is_initialized())
    except Exception as e:  # hashes matched, so this is a format problem: name it
        raise CheckpointError(
            f"checkpoint {where} could not be read by torch.distributed.checkpoint: {e}"
        ) from e
    return unflatten(tensors, manifest), manifest


def torch_optimizer_state(optim: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """The name-keyed ``optim`` of a full state as ``torch.optim.Optimizer.state_dict()`` of an
    optimizer built as ``factory(model.parameters())`` (one parameter group, indices in
    ``model.parameters()`` order): load it into the original, unparallelised training."""
    groups = optim["param_groups"]
    if len(groups) != 1:
        raise CheckpointError(
            f"the saved optimizer has {len(groups)} parameter groups; the index-keyed form is defined "
            "for one group (factory(model.parameters())): map optim['state'] by name yourself"
        )
    names = [n for n, _ in model.named_parameters()]
    state = {i: dict(optim["state"][n]) for i, n in enumerate(names) if n in optim["state"]}
    group = {k: tuple(v) if isinstance(v, list) else v for k, v in groups[0].items()}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(names)))}]}
