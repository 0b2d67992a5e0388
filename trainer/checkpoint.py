"""Save and restore everything a run needs to continue exactly: weights, optimizer, schedule, the
data stream's position and every rank's RNGs, the step, the resolved config and the metrics.

Layout of `<ckpt.dir>/checkpoints/`:
    step_00000040/                one checkpoint (DeepSpeed's files, or model.safetensors + optimizer.pt)
        state.json                shared: step, epoch, history, config, world size, engine, ZeRO stage
        rank{r}.json              per rank: RNG states (torch, numpy, python, mask generator), data stream
        COMPLETE                  written last, after every rank finished: the sha256 of every file
    latest                        the tag of the newest complete checkpoint (atomic rename)
    best                          with validation on: the tag of the complete checkpoint with the lowest
                                  validation loss (atomic rename); rotation (`keep`) never deletes it

`latest` moves only after a complete save, so a crash mid-save leaves the previous checkpoint as
the one `resume=auto` picks. Loading never unpickles arbitrary objects: DeepSpeed's own files go
through `torch.load(weights_only=True)` with the few DeepSpeed classes they hold allow-listed, and
every file is checked against the sha256 recorded in COMPLETE first, so a truncated or edited file
is named before anything reads it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from data_pipeline.fs import atomic_write, exists, filesystem, read_bytes, retrying
from models.hub import first_nonfinite, join

from . import distributed as dist
from .engine import NonFiniteError, kernels_kept, torch_optimizer
from .state import Stateful

LATEST, BEST, COMPLETE, STATE = "latest", "best", "COMPLETE", "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, truncated or tampered with; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------- safe loading

def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed writes into its checkpoint files."""
    out = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    return out


@contextlib.contextmanager
def safe_torch_load():
    """Within this block every torch.load (ours or DeepSpeed's) is weights_only=True, and a file
    that cannot be read is reported by name as truncated or tampered."""
    original = torch.load
    allowed = _safe_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise CheckpointError(f"{f}: cannot be loaded safely (truncated, tampered with, or not a "
                                  f"checkpoint file): {str(e).splitlines()[0]}") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ----------------------------------------------------------------------------- files

def _write_json(path: Path, obj: Any) -> None:
    atomic_write(str(path), json.dumps(obj).encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from None


def _read_pointer(ckpt_dir: str | Path, name: str) -> Optional[str]:
    d = Path(ckpt_dir)
    p = d / name
    if not p.exists():
        return None
    tag = p.read_text().strip()
    if not (d / tag / COMPLETE).exists():
        raise CheckpointError(f"{p} names {tag}, which is not a complete checkpoint")
    return tag


def latest_tag(ckpt_dir: str | Path) -> Optional[str]:
    """The tag `latest` names (None when there is no checkpoint yet)."""
    return _read_pointer(ckpt_dir, LATEST)


def set_latest(ckpt_dir: str | Path, tag: str) -> None:
    """Point `latest` at a complete checkpoint (a rollback). Rank 0 only, not collective."""
    d = Path(ckpt_dir)
    if not (d / tag / COMPLETE).exists():
        raise CheckpointError(f"{d / tag}: not a complete checkpoint, cannot be named latest")
    atomic_write(str(d / LATEST), tag.encode())


def best_tag(ckpt_dir: str | Path) -> Optional[str]:
    """The tag `best` names (None when the run never validated)."""
    return _read_pointer(ckpt_dir, BEST)


def set_best(ckpt_dir: str | Path, tag: Optional[str]) -> None:
    """Point `best` at a complete checkpoint (None removes the pointer). Rank 0 only, not collective."""
    d = Path(ckpt_dir)
    if tag is None:
        (d / BEST).unlink(missing_ok=True)
        return
    if not (d / tag / COMPLETE).exists():
        raise CheckpointError(f"{d / tag}: not a complete checkpoint, cannot be named best")
    atomic_write(str(d / BEST), tag.encode())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _digests(folder: Path) -> dict:
    return {str(f.relative_to(folder)): _sha256(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != COMPLETE and ".tmp" not in f.name}


def verify(folder: str | Path) -> None:
    """Check every file recorded when the save completed against its sha256; raises naming the file."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {COMPLETE} marker)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{folder / COMPLETE}: corrupt") from None
    if not isinstance(marker, dict):  # a derived folder (e.g. the universal conversion): nothing recorded
        return
    for name, digest in (marker.get("sha256") or {}).items():
        f = folder / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing, though {folder} was saved complete with it (deleted or not "
                                  f"copied); restore it or resume from another checkpoint")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: content differs from the sha256 recorded when the checkpoint was saved "
                                  f"(truncated, tampered with or corrupted on disk)")


def read_state(ckpt_dir: str | Path, tag: str) -> dict:
    folder = Path(ckpt_dir) / tag
    if not (folder / COMPLETE).exists():
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {COMPLETE} marker)")
    return _read_json(folder / STATE)


# ----------------------------------------------------------------------------- save / load

def save(engine, ckpt_dir: str | Path, step: int, states: dict[str, Stateful], meta: Optional[dict] = None, *,
         keep: int, best: bool = False, weights_only: bool = False) -> Path:
    """Collective: the engine's files, every registered state (shared ones merged with `meta`, the
    run's description, into state.json by rank 0; the others into each rank's rank{r}.json under
    their names), then COMPLETE and `latest`. `best`: this checkpoint becomes the one `best` names
    (after it is complete, like `latest`). `weights_only`: fp32 weights as model.safetensors and no
    optimizer state, whatever the engine (ZeRO <= 2: whole parameters on rank 0); training cannot
    continue from it, so rotation always keeps the newest full checkpoint."""
    d = Path(ckpt_dir)
    tag = tag_for(step)
    folder = d / tag
    rank, _ = dist.world()

    def prepare() -> None:
        bad = first_nonfinite(engine.module.state_dict())
        if bad is not None:  # the training loop stops first; this is the last line of defence
            raise NonFiniteError(f"{folder}: not saved, parameter {bad} holds NaN or inf")
        if (d / LATEST).exists() and (d / LATEST).read_text().strip() == tag:
            raise CheckpointError(f"{folder}: refusing to write over the checkpoint `latest` names")
        if folder.exists():  # an interrupted save of this step, or a complete one of an abandoned timeline
            (folder / COMPLETE).unlink(missing_ok=True)  # first: a half-deleted folder never looks complete
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)

    dist.agree(prepare if rank == 0 else (lambda: None), f"preparing {folder}")
    if not weights_only:  # DeepSpeed: model + optimizer shards; the plain engine: its two files
        engine.save_checkpoint(str(d), tag=tag, client_state={}, save_latest=False)
    elif rank == 0:
        save_file({k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in engine.module.state_dict().items()}, str(folder / "model.safetensors"))
    _crash_point(tag)
    shared = {**(meta or {}), "resumable": not weights_only}
    for s in states.values():
        if s.shared:
            shared.update(s.state_dict())
    _write_json(folder / f"rank{rank}.json", {name: s.state_dict() for name, s in states.items() if not s.shared})
    if rank == 0:
        _write_json(folder / STATE, shared)
    dist.barrier()
    if rank == 0:
        _write_json(folder / COMPLETE, {"step": step, "sha256": _digests(folder)})
        atomic_write(str(d / LATEST), tag.encode())  # the pointer moves only now, atomically
        if best:
            atomic_write(str(d / BEST), tag.encode())
        _rotate(d, tag, keep, weights_only)
    dist.barrier()
    return folder


def _rotate(d: Path, tag: str, keep: int, weights_only: bool) -> None:
    """Keep the newest `keep` complete checkpoints, counting `tag` whatever its step (after a rollback
    an older-numbered checkpoint is the latest), always the one `best` names, and the newest one
    training can continue from."""
    if keep <= 0:
        return
    keep_best = (d / BEST).read_text().strip() if (d / BEST).exists() else None
    others = sorted(p for p in d.glob("step_????????") if p.is_dir() and p.name not in (tag, keep_best)
                    and (p / COMPLETE).exists())
    if weights_only:
        full = [p for p in others if _read_json(p / STATE).get("resumable", True)]
        others = [p for p in others if p not in full[-1:]]
    for old in others[:max(0, len(others) - (keep - 1))]:
        (old / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)


def _crash_point(tag: str) -> None:
    """Fault injection for tests: SIMMTM_CRASH_DURING_SAVE=<tag> SIGKILLs this process after the
    engine wrote its shards and before the checkpoint is complete (a real kill -9 mid-save)."""
    if os.environ.get("SIMMTM_CRASH_DURING_SAVE") == tag:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def to_universal(ckpt_dir: str | Path, tag: str) -> str:
    """Convert a ZeRO checkpoint for loading at another world size (DeepSpeed's universal format).

    Rank 0 converts once (in a subprocess, with safe loading); every rank returns the new tag.
    """
    d = Path(ckpt_dir)
    out = d / f"{tag}_universal"

    def convert() -> None:
        if (out / COMPLETE).exists():
            return
        verify(d / tag)
        shutil.rmtree(out, ignore_errors=True)
        code = ("import sys; from trainer.checkpoint import safe_torch_load\n"
                "from deepspeed.checkpoint import ds_to_universal as conv\n"
                "sys.argv = ['ds_to_universal', '--input_folder', sys.argv[1], '--output_folder', sys.argv[2], "
                "'--inject_missing_state', '--num_extract_workers', '1', '--num_merge_workers', '1']\n"
                "with safe_torch_load():\n"
                "    conv.main(conv.parse_arguments())\n")
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        proc = subprocess.run([sys.executable, "-c", code, str(d / tag), str(out)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise CheckpointError(f"{d / tag}: conversion to DeepSpeed's universal format failed:\n"
                                  f"{proc.stderr[-3000:]}")
        _write_json(out / COMPLETE, {"converted_from": tag})  # no digests: derived, and verified at the source

    dist.agree(convert if dist.world()[0] == 0 else (lambda: None), f"converting {d / tag} to the universal format")
    return out.name


def load(engine, ckpt_dir: str | Path, tag: str, load_optimizer: bool = True) -> None:
    """Restore model, optimizer and schedule into `engine` (collective under DeepSpeed)."""
    folder = Path(ckpt_dir) / tag
    # once per node (ranks of a node read the same files); a bad file on one node stops every rank
    dist.agree(lambda: verify(folder) if dist.discover().local_rank == 0 else None, f"verifying {folder}")
    # fused on CUDA, whichever device wrote the checkpoint
    with kernels_kept(torch_optimizer(engine)), safe_torch_load():
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer,
                                         load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed found no checkpoint to load")


@dataclass
class ResumePoint:
    """The checkpoint a run continues from: its folder, tag and state.json."""
    dir: Path
    tag: str
    state: dict

    def resized(self, world_size: int) -> bool:
        return self.state["world_size"] != world_size

    def universal(self, world_size: int) -> bool:
        """A ZeRO checkpoint written at another world size loads through DeepSpeed's universal format."""
        return self.resized(world_size) and self.state["engine"] == "deepspeed" and self.state.get("zero_stage", 0) > 0


def resume(engine, states: dict[str, Stateful], point: ResumePoint, world_size: int) -> None:
    """Continue from `point`: the engine's weights, optimizer and schedule, then every registered
    state, in registration order. At the world size it was saved with this is exact: each rank gets
    its own states back (data position, RNG streams). At another one the engine loads through the
    universal conversion (built with load_universal; buffers copied from the original), shared
    states load, and per-rank states, which have no counterpart, start afresh: `restart(step)` where
    they define it (the RNG streams), else as built (the data order restarts the epoch). Collective."""
    universal = point.universal(world_size)
    load(engine, point.dir, to_universal(point.dir, point.tag) if universal else point.tag)
    if universal:
        restore_buffers(engine.module, point.dir, point.tag)
    mine = None if point.resized(world_size) else load_rank_state(point.dir, point.tag, dist.world()[0])
    for name, s in states.items():
        if s.shared:
            s.load_state_dict(point.state)
        elif mine is not None:
            s.load_state_dict(mine[name])
        elif hasattr(s, "restart"):
            s.restart(point.state["step"])


def restore_buffers(module: torch.nn.Module, ckpt_dir: str | Path, tag: str) -> None:
    """DeepSpeed's universal loading restores parameters and optimizer state but not buffers
    (BatchNorm running statistics): copy them from the original checkpoint's module states."""
    folder = Path(ckpt_dir) / tag
    files = sorted(folder.glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{folder}: no DeepSpeed model states file")
    with safe_torch_load():
        saved = torch.load(files[0], map_location="cpu")["module"]
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved:
                buf.copy_(saved[name].to(buf.dtype))


def load_rank_state(ckpt_dir: str | Path, tag: str, rank: int) -> dict:
    return _read_json(Path(ckpt_dir) / tag / f"rank{rank}.json")


# ----------------------------------------------------------------------------- remote mirror

def upload(folder: Path, remote: str, storage_options: Optional[dict], local_rank: int, keep: int = 0,
           best: Optional[str] = None) -> None:
    """Mirror a complete local checkpoint to `remote` (any fsspec URL) and keep its newest `keep`. Collective.

    Staging may be node-local, so each node's local rank 0 uploads the files its node wrote; the
    COMPLETE marker and then the remote `latest` go up last, from rank 0, after every node is done:
    the remote `latest` too only ever names a complete checkpoint. `best` (a tag already uploaded,
    possibly this one) goes up as the remote `best` pointer and is never pruned.
    """
    fs, base = filesystem(remote, storage_options)
    tag = folder.name

    def put_files() -> None:
        if local_rank != 0:
            return
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name != COMPLETE:
                retrying(lambda f=f: fs.put_file(str(f), f"{base}/{tag}/{f.name}"), f"upload {f.name}")
            elif f.is_dir():  # DeepSpeed universal/zero sub-folders
                retrying(lambda f=f: fs.put(str(f), f"{base}/{tag}/{f.name}", recursive=True), f"upload {f.name}")

    def publish_pointer() -> None:
        if dist.world()[0] != 0:
            return
        atomic_write(join(remote, f"{tag}/{COMPLETE}"), (folder / COMPLETE).read_bytes(), storage_options)
        atomic_write(join(remote, LATEST), tag.encode(), storage_options)
        if best is not None:
            atomic_write(join(remote, BEST), best.encode(), storage_options)
        if keep > 0:
            fs.invalidate_cache()
            tags = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
            others = [t for t in tags if len(t) == len(tag) and t.startswith("step_") and t not in (tag, best)]
            for old in others[:max(0, len(others) - (keep - 1))]:
                if fs.exists(f"{base}/{old}/{COMPLETE}"):  # the marker first: never a half-deleted "complete" one
                    retrying(lambda old=old: fs.rm_file(f"{base}/{old}/{COMPLETE}"), f"prune {old}")
                retrying(lambda old=old: fs.rm(f"{base}/{old}", recursive=True), f"prune {old}")

    dist.agree(put_files, f"uploading {folder} to {remote}")
    dist.agree(publish_pointer, f"publishing {remote}/{tag}")


def set_remote_latest(remote: str, tag: str, storage_options: Optional[dict]) -> None:
    """Point the mirror's `latest` at `tag` (a rollback), so resume=auto never downloads the abandoned
    timeline's newer checkpoint. Rank 0 only."""
    if not exists(join(remote, f"{tag}/{COMPLETE}"), storage_options):
        raise CheckpointError(f"{remote}/{tag}: not a complete checkpoint, cannot be named latest")
    atomic_write(join(remote, LATEST), tag.encode(), storage_options)


def remote_latest(remote: str, storage_options: Optional[dict]) -> Optional[str]:
    try:
        tag = read_bytes(join(remote, LATEST), storage_options).decode().strip()
    except FileNotFoundError:
        return None
    if not exists(join(remote, f"{tag}/{COMPLETE}"), storage_options):
        raise CheckpointError(f"{remote}/{LATEST} names {tag}, which is not a complete checkpoint")
    return tag


def download(remote: str, tag: str, ckpt_dir: Path, storage_options: Optional[dict], local_rank: int,
             timeout_s: float = 3600.0) -> None:
    """Fetch a remote checkpoint into the local checkpoint folder before the process group exists:
    each node's local rank 0 downloads into a temporary folder and renames it into place; the
    node's other ranks wait for it."""
    import time

    dest = Path(ckpt_dir) / tag
    if (dest / COMPLETE).exists():
        return
    if local_rank == 0:
        fs, base = filesystem(remote, storage_options)
        tmp = dest.with_name(dest.name + ".download")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        retrying(lambda: fs.get(f"{base}/{tag}/", str(tmp), recursive=True), f"download {remote}/{tag}")
        if not (tmp / COMPLETE).exists():
            raise CheckpointError(f"{remote}/{tag}: download incomplete (no {COMPLETE})")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return
    deadline = time.time() + timeout_s
    while not (dest / COMPLETE).exists():
        if time.time() > deadline:
            raise CheckpointError(f"{dest}: local rank 0 did not finish downloading {remote}/{tag}")
        time.sleep(0.5)
