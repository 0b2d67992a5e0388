"""Run state a checkpoint carries, as objects with `state_dict()` / `load_state_dict()`.

Each declares `shared`: one copy for all ranks (rank 0 merges it into state.json) or each rank's own
(rank{r}.json, under the name it is registered with). `checkpoint.save` / `checkpoint.resume` take
them as one dict, so adding run state means registering one more object (lingua's TrainState and
torchtitan's Stateful checkpointer work the same way).
"""
from __future__ import annotations

import random
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Protocol

import numpy as np
import torch


class Stateful(Protocol):
    shared: bool

    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...


@dataclass
class TrainState:
    """Where the run is: the optimizer step, the data epoch, the logged history, the best checkpoint
    so far ({tag, step, val_loss}), every setting changed on resume ({key, from, to, step}) and the
    constraint loss's series count (for its reference values when a resumed run trains nothing)."""
    shared: ClassVar[bool] = True
    step: int = 0
    epoch: int = 0
    history: list = field(default_factory=list)
    best: Optional[dict] = None
    config_changes: list = field(default_factory=list)
    constraint_num_series: Optional[int] = None

    def state_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def load_state_dict(self, sd: dict) -> None:
        self.__init__(**{f.name: sd[f.name] for f in dataclasses.fields(self) if f.name in sd})


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState:
    """This rank's random streams: torch's (dropout), numpy's, Python's, CUDA's and the mask generator
    (seeded seed * 1000 + rank, apart from dropout so masks do not depend on the model)."""
    shared: ClassVar[bool] = False

    def __init__(self, device: torch.device, seed: int, rank: int):
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator(device=device).manual_seed(seed * 1000 + rank)

    def state_dict(self) -> dict:
        return rng_state(self.generator)

    def load_state_dict(self, sd: dict) -> None:
        set_rng_state(sd, self.generator)

    def restart(self, step: int) -> None:
        """Resumed at another world size (no saved streams for this rank): fresh streams, distinct
        per step so that a resume does not replay the masks of the run's first steps."""
        self.generator.manual_seed(self.seed * 1000 + self.rank + 7919 * step)
        torch.manual_seed(self.seed + self.rank + 7919 * step)
