"""Run folders: a new run, a continued one, or a new branch from an older checkpoint.

One folder holds one run's history. A new run never lands silently in a folder that holds another
run's checkpoints; a resumed run refuses settings it cannot honour and records the ones it applies,
with the step they took effect; a rollback keeps the abandoned checkpoints aside instead of crashing
into them after training.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from trainer import checkpoint
from trainer import distributed as dist
from trainer.config import Config, ConfigError

# Settings a resumed run may change, applied from the step it resumes at. Everything else shapes the
# weights, the optimizer or the data stream the checkpoint continues, and must match it.
MUTABLE = ("name", "train.max_steps", "train.epochs", "train.log_every", "train.progress", "train.num_threads",
           "train.val_every", "train.on_nonfinite", "train.max_nonfinite_in_row", "train.compile",
           "dist.backend", "dist.deepspeed", "dist.ds_config", "data.cache_dir", "data.num_workers", "data.prefetch",
           "data.read_ahead", "data.retries", "data.retry_backoff", "data.io_timeout", "data.storage_options",
           "data.verify_checksums", "ckpt", "log")

ASIDE = "abandoned"  # checkpoints/abandoned/<time>_after_<tag>/: checkpoints a rollback left behind


class RunFolderError(ConfigError):
    """ckpt.dir / ckpt.resume would mix two runs or contradict the checkpoint being resumed."""


def previous_run(run_dir: Path) -> Optional[str]:
    """What an earlier run left in `run_dir` that a new run would overwrite or mix with (None: nothing)."""
    ckpt_dir = run_dir / "checkpoints"
    tags = sorted(p.name for p in ckpt_dir.glob("step_????????") if (p / checkpoint.COMPLETE).exists())
    if tags:
        return f"checkpoints up to {tags[-1]}"
    if (run_dir / "summary.json").exists():
        return "a summary.json"
    return None


def newest_resumable(ckpt_dir: Path) -> str:
    """The newest complete checkpoint saved with its optimizer state (ckpt.save_optimizer_every)."""
    for p in sorted(ckpt_dir.glob("step_????????"), reverse=True):
        if (p / checkpoint.COMPLETE).exists() and checkpoint.read_state(ckpt_dir, p.name).get("resumable", True):
            return p.name
    raise checkpoint.CheckpointError(f"{ckpt_dir}: no checkpoint holds the optimizer state training continues from "
                                     f"(only weights-only ones, ckpt.save_optimizer_every)")


def resume_point(cfg: Config) -> Optional[checkpoint.ResumePoint]:
    """The checkpoint ckpt.resume = none | auto | <path> names (None: a new run). A new run into a
    folder holding another run is refused, and so is a checkpoint named by path that was saved
    without its optimizer state; auto takes the newest one saved with it.

    Not collective: every rank reads the same files before the process group exists.
    """
    run_dir = Path(cfg.ckpt.dir)
    ckpt_dir = run_dir / "checkpoints"
    if cfg.ckpt.resume == "auto" and not cfg.ckpt.overwrite:  # overwrite: start over whatever is there
        tag = checkpoint.latest_tag(ckpt_dir)
        if cfg.ckpt.remote:  # the mirror may hold a newer checkpoint (e.g. node-local disks were lost)
            remote = checkpoint.remote_latest(cfg.ckpt.remote, cfg.ckpt.storage_options)
            if remote is not None and (tag is None or remote > tag):
                checkpoint.download(cfg.ckpt.remote, remote, ckpt_dir, cfg.ckpt.storage_options,
                                    dist.discover().local_rank)
                tag = remote
        if tag is not None and not checkpoint.read_state(ckpt_dir, tag).get("resumable", True):
            tag = newest_resumable(ckpt_dir)  # the weights-only ones after it are trained again
        return _point(ckpt_dir, tag)
    if cfg.ckpt.resume in ("none", "auto"):
        source = None
    else:
        source = Path(cfg.ckpt.resume)
        if not (source / checkpoint.COMPLETE).is_file():
            raise checkpoint.CheckpointError(f"ckpt.resume: {source} is not a complete checkpoint folder")
        if source.parent.resolve() == ckpt_dir.resolve():
            return _point(source.parent, source.name)  # this run's own checkpoint: a continuation or a rollback
    found = previous_run(run_dir)
    if found and not cfg.ckpt.overwrite:
        start = "starting from " + str(source) if source else "a new run"
        raise RunFolderError(
            f"ckpt.dir={run_dir} already holds another run ({found}); {start} would mix with it. "
            f"Continue it with ckpt.resume=auto, pick a new ckpt.dir, or replace it with ckpt.overwrite=true")
    return _point(source.parent, source.name) if source else None


def _point(folder: Path, tag: Optional[str]) -> Optional[checkpoint.ResumePoint]:
    if tag is None:
        return None
    state = checkpoint.read_state(folder, tag)
    if not state.get("resumable", True):
        raise checkpoint.CheckpointError(
            f"{folder / tag}: holds weights only (ckpt.save_optimizer_every), so training cannot "
            f"continue from it exactly; resume from a checkpoint saved with its optimizer state")
    return checkpoint.ResumePoint(folder, tag, state)


def prepare(cfg: Config, point: Optional[checkpoint.ResumePoint], is_main: bool) -> str:
    """ckpt.overwrite clears the folder; resuming this run from an older checkpoint starts a branch.
    Returns a note for the log. Collective."""
    run_dir, ckpt_dir = Path(cfg.ckpt.dir), Path(cfg.ckpt.dir) / "checkpoints"
    own = point is not None and point.dir.resolve() == ckpt_dir.resolve()
    if cfg.ckpt.overwrite and not own:
        gone = dist.agree(lambda: clear(run_dir) if is_main else [], f"clearing {run_dir}")
        return f", replacing the run in {run_dir} (removed {', '.join(gone)})" if gone else ""
    if own:
        aside = dist.agree(lambda: branch(ckpt_dir, point.tag, cfg.ckpt.remote, cfg.ckpt.storage_options)
                           if is_main else None, f"branching {ckpt_dir} at {point.tag}")
        if aside is not None:
            return f", a new branch from {point.tag}: the newer checkpoints moved to {aside}"
    return ""


def restore_best(ckpt_dir: Path, point: checkpoint.ResumePoint, is_main: bool) -> Optional[dict]:
    """The best checkpoint as of the resumed one, its pointer put back to match (a rollback may have
    left one naming a checkpoint of the abandoned timeline). A best held in another run's folder
    (ckpt.resume=<path> elsewhere) does not carry over: selection starts afresh. Collective."""
    best = point.state.get("best") if point.dir.resolve() == ckpt_dir.resolve() else None
    if best is not None and not (ckpt_dir / best["tag"] / checkpoint.COMPLETE).exists():
        best = None
    # always rewritten: resuming from another folder must not leave this folder's stale pointer behind
    dist.agree(lambda: checkpoint.set_best(ckpt_dir, best["tag"] if best else None) if is_main else None,
               f"restoring {ckpt_dir / checkpoint.BEST}")
    return best


def clear(run_dir: Path) -> list[str]:
    """ckpt.overwrite: remove an earlier run's outputs from `run_dir` (rank 0). Returns what went."""
    gone = []
    for name in ("checkpoints", "tb", "summary.json", "config.json", "ds_config.json"):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        gone.append(name)
    return gone


def branch(ckpt_dir: Path, tag: str, remote: str = "", storage_options: Optional[dict] = None) -> Optional[Path]:
    """Resuming this run from an older checkpoint than `latest`: start a new branch there. The newer
    checkpoints (and their universal conversions) move to checkpoints/abandoned/<time>_after_<tag>/,
    where nothing reads or prunes them, and `latest` names `tag`, here and on the `remote` mirror.
    Rank 0; returns the folder or None."""
    latest = checkpoint.latest_tag(ckpt_dir)
    newer = sorted(p for p in ckpt_dir.glob("step_????????*") if p.is_dir() and p.name[:13] > tag)
    if latest is None or latest <= tag and not newer:
        return None
    aside = ckpt_dir / ASIDE / f"{time.strftime('%Y%m%d-%H%M%S')}_after_{tag}"
    aside.mkdir(parents=True, exist_ok=True)
    checkpoint.set_latest(ckpt_dir, tag)  # first: `latest` never names a folder being moved
    if remote:
        checkpoint.set_remote_latest(remote, tag, storage_options)
    for p in newer:
        p.rename(aside / p.name)
    best = ckpt_dir / checkpoint.BEST
    if best.exists() and not (ckpt_dir / best.read_text().strip() / checkpoint.COMPLETE).exists():
        best.unlink()  # it named a moved checkpoint; train() puts back the best as of `tag`
    return aside


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def config_changes(saved: dict, now: dict, step: int) -> list[dict]:
    """The settings that differ from the checkpoint's: those in MUTABLE as [{key, from, to, step}];
    any other raises naming every such key. Keys the checkpoint predates are not changes."""
    old, new = flatten(saved), flatten(now)
    changed = sorted(k for k in new if k in old and _norm(old[k]) != _norm(new[k]))
    fixed = [k for k in changed if not any(k == m or k.startswith(m + ".") for m in MUTABLE)]
    if fixed:
        what = "; ".join(f"{k}: {old[k]!r} in the checkpoint, {new[k]!r} now" for k in fixed)
        raise RunFolderError(
            f"cannot change on resume: {what}. These shape the weights, optimizer state or data stream the "
            f"checkpoint continues; resume with the checkpoint's values, or start a new run (a new ckpt.dir, "
            f"with ckpt.resume=none)")
    return [{"key": k, "from": old[k], "to": new[k], "step": step}
            for k in changed if k not in ("ckpt.resume", "ckpt.overwrite")]


def describe(changes: list[dict]) -> str:
    return ", ".join(f"{c['key']} {c['from']!r} -> {c['to']!r}" for c in changes)
