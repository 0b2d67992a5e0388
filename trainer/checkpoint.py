"""Save and restore everything a run needs to continue exactly: weights, optimizer, schedule, data
stream position, every rank's RNGs, step and metrics.

A checkpoint is a folder `step_XXXXXXXX` under the run's checkpoint directory. The `latest` file
moves (atomic rename) only after every rank finished writing and the folder was marked complete,
so a crash mid-save leaves the previous checkpoint as the one `resume=auto` picks.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import distributed as dist

LATEST, COMPLETE = "latest", "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state(generator: Optional[torch.Generator]) -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]],
            "mask_generator": generator.get_state().tolist() if generator is not None else None,
            "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}


def set_rng_state(state: dict, generator: Optional[torch.Generator]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if generator is not None and state.get("mask_generator") is not None:
        generator.set_state(torch.tensor(state["mask_generator"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def latest_tag(ckpt_dir: str | Path) -> Optional[str]:
    """The tag `latest` names, if that checkpoint is complete."""
    d = Path(ckpt_dir)
    p = d / LATEST
    if not p.exists():
        return None
    tag = p.read_text().strip()
    if not (d / tag / COMPLETE).exists():
        raise RuntimeError(f"{p} names {tag}, which is not a complete checkpoint")
    return tag


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Rank-local files (RNG) go beside the engine's own files."""
    d = Path(ckpt_dir)
    tag = tag_for(step)
    folder = d / tag
    rank, _ = dist.world()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    shared = {k: v for k, v in client_state.items() if k != "rng"}
    if hasattr(engine, "save_checkpoint"):  # DeepSpeed: model + optimizer shards per rank
        engine.save_checkpoint(str(d), tag=tag, client_state=shared, save_latest=False)
    elif rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in engine.module.state_dict().items()},
                  str(folder / "model.safetensors"))
        torch.save({"optimizer": engine.optimizer.state_dict(), "scheduler": engine.scheduler.state_dict(),
                    "micro": engine.micro, "global_steps": engine.global_steps}, folder / "optimizer.pt")
        _write_json(folder / "client_state.json", shared)
    _write_json(folder / f"rng_rank{rank}.json", client_state["rng"])
    dist.barrier()
    if rank == 0:
        (folder / COMPLETE).write_text("ok\n")
        tmp = d / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, d / LATEST)  # the pointer moves only now, atomically
        done = sorted(p for p in d.glob("step_*") if p.is_dir() and (p / COMPLETE).exists())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def load(engine, ckpt_dir: str | Path, tag: str, generator: Optional[torch.Generator]) -> dict:
    """Restore engine state and this rank's RNGs; returns the client state (step, data, metrics)."""
    d = Path(ckpt_dir)
    folder = d / tag
    rank, _ = dist.world()
    if hasattr(engine, "load_checkpoint"):
        _, client = engine.load_checkpoint(str(d), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"{folder}: DeepSpeed could not load this checkpoint")
    else:
        engine.module.load_state_dict(load_file(str(folder / "model.safetensors")))
        opt = torch.load(folder / "optimizer.pt", weights_only=True)
        engine.optimizer.load_state_dict(opt["optimizer"])
        engine.scheduler.load_state_dict(opt["scheduler"])
        engine.micro, engine.global_steps = opt["micro"], opt["global_steps"]
        client = json.loads((folder / "client_state.json").read_text())
    rng_file = folder / f"rng_rank{rank}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()), generator)
    return client
