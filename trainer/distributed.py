"""Everything that knows about other processes lives here, and nowhere else.

Launchers tell a process who it is in different ways: torchrun and the deepspeed launcher set
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; Slurm's srun sets SLURM_*; Open MPI / PMI set their own; a
plain `python` sets nothing. `discover()` turns any of them into one `DistEnv`, `setup()` exports
the standard variables (so DeepSpeed never falls back to mpi4py) and starts the process group.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn, Optional

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # torchrun | deepspeed | slurm | mpi | single
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host lists, as `scontrol show hostnames` does:
    'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1; 'rack[1-2]-n[1-2]' -> rack1-n1 rack1-n2 ..."""
    hosts: list[str] = []
    for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):  # split on commas outside brackets
        hosts.extend(_expand_host(part))
    return hosts


def _expand_host(part: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", part)
    if not m:
        return [part]
    prefix, ranges, rest = m.groups()
    heads = []
    for r in ranges.split(","):
        if "-" in r:
            lo, hi = r.split("-", 1)
            heads.extend(f"{prefix}{k:0{len(lo)}d}" for k in range(int(lo), int(hi) + 1))
        else:
            heads.append(f"{prefix}{r}")
    return [h + tail for h in heads for tail in _expand_host(rest)]  # later bracket groups vary fastest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover(environ: Optional[dict] = None) -> DistEnv:
    """Rank, world and rendezvous from whichever launcher started this process."""
    e = os.environ if environ is None else environ
    port = int(e.get("MASTER_PORT", 0) or 0)
    if "RANK" in e and "WORLD_SIZE" in e:
        launcher = "deepspeed" if "CROSS_RANK" in e or "DS_ACCELERATOR" in e or "PDSH_RCMD_TYPE" in e else "torchrun"
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), port or 29500, launcher)
    if "SLURM_PROCID" in e and ("SLURM_STEP_NUM_TASKS" in e or "SLURM_NTASKS" in e):
        # The job step's nodes and tasks first: `srun --nodelist`/`-n` (e.g. DeepSpeed's Slurm launcher
        # with --include/--exclude) may run on a subset of the allocation, whose first node may hold no task.
        nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST")
        hosts = expand_nodelist(nodelist or "127.0.0.1")
        world = int(e.get("SLURM_STEP_NUM_TASKS") or e["SLURM_NTASKS"])
        # A port every task derives alike from the job id, unless the batch script chose one.
        job = int(e.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(int(e["SLURM_PROCID"]), world, int(e.get("SLURM_LOCALID", 0)),
                       e.get("MASTER_ADDR") or hosts[0], port or 20000 + job % 20000, "slurm")
    if "OMPI_COMM_WORLD_RANK" in e or "PMI_RANK" in e:
        rank = int(e.get("OMPI_COMM_WORLD_RANK", e.get("PMI_RANK", 0)))
        world = int(e.get("OMPI_COMM_WORLD_SIZE", e.get("PMI_SIZE", 1)))
        local = int(e.get("OMPI_COMM_WORLD_LOCAL_RANK", e.get("MPI_LOCALRANKID", 0)))
        if "MASTER_ADDR" not in e and world > 1:
            raise RuntimeError("MPI launch: set MASTER_ADDR (and MASTER_PORT) to the first host for rendezvous")
        return DistEnv(rank, world, local, e.get("MASTER_ADDR", "127.0.0.1"), port or 29500, "mpi")
    return DistEnv(0, 1, 0, "127.0.0.1", port or _free_port(), "single")


def setup(backend: str = "auto", use_deepspeed: bool = False) -> DistEnv:
    """Export the standard variables, pick the device, start the process group when needed."""
    env = discover()
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        env.device = torch.device("cuda", torch.cuda.current_device())
    else:
        env.device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if env.device.type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed

        _interpreter_bin_first_on_path()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        _unlink_shm_segment(env)
    elif env.distributed and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return env


def start(cfg, num_threads: int = 0) -> DistEnv:
    """Process setup every entry point shares: DeepSpeed whenever several ranks run (`cfg`: the
    config's `dist` section, whose `deepspeed` is set accordingly), the process group, and torch's
    intra-op thread count (0 keeps torch's default)."""
    cfg.deepspeed = cfg.deepspeed or discover().world_size > 1
    env = setup(cfg.backend, use_deepspeed=cfg.deepspeed)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return env


def _interpreter_bin_first_on_path() -> None:
    """DeepSpeed JIT-loads its CPU comm op at init through torch, which runs `ninja` from PATH. A rank
    started where the environment's bin folder is not on PATH (an ssh session of the pdsh runner, a
    shell without the venv activated) finds another ninja, whose different log hash makes it rebuild
    the shared cached op (a minute, then again for the next rank using the other one), or none, and
    fails. The interpreter's own folder holds the ninja its packages installed."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir


SHM_DIR = "/dev/shm"


def shm_segment_name(rank, addr: str, port) -> str:
    """The name DeepSpeed's CPU shared-memory all-reduce gives a rank's 64 MiB workspace."""
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_segment(env: DistEnv) -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm segment per rank and never unlinks it, so every
    run on a node leaves 64 MiB of RAM per rank behind. Once every rank has mapped every peer's
    segment (shm_initialize runs inside init_distributed, so after a barrier all have), the names
    can go: the mappings live until the processes exit, and the memory with them."""
    if env.device.type != "cpu" or not os.path.isdir(SHM_DIR):  # only DeepSpeed's CPU accelerator maps one
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    rank = dist.get_rank() if dist.is_initialized() else env.rank
    path = os.path.join(SHM_DIR, shm_segment_name(rank, os.environ.get("MASTER_ADDR", ""),
                                                    os.environ.get("MASTER_PORT", "")))
    try:
        os.unlink(path)
    except FileNotFoundError:  # not all ranks on one node, or an accelerator backend: no segment
        pass


def exit_process(code: int = 0) -> NoReturn:
    """End an entry script: every trainer entry point's `__main__` ends with this (cli.run turns any
    error into its exit code, so it always runs), and nothing else tears down.

    The process group is destroyed while the interpreter is whole. A gloo one then ends the process
    at once, output flushed, instead of finalising the interpreter: DeepSpeed 0.19.8 on CPU (torch
    2.13) keeps a gloo group referenced from C++ past destroy_process_group, and its threads running
    into interpreter finalisation abort a rank whose work is done ("terminate called without an
    active exception", exit code 250; measured in 2 of 10 two-rank launches without this, 0 of 10
    with it), which fails the whole launch. The other DeepSpeed workaround is at setup
    (_unlink_shm_segment)."""
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    gloo = dist.get_backend() == "gloo"
    dist.destroy_process_group()
    if not gloo:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


class _AllGather(torch.autograd.Function):
    """Concatenate equal-shaped tensors from all ranks; the backward returns each rank the sum of
    every rank's gradient for its slice (reduce-scatter on NCCL; all-reduce on gloo, which has no
    reduce-scatter)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":  # reduce-scatter moves half the bytes of an all-reduce
            out = torch.empty_like(grad[: ctx.n])
            dist.reduce_scatter_tensor(out, grad)
            return out
        grad = grad.clone()  # never reduce into the buffer autograd handed us
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank's output feeds every rank's loss, so the backward sums too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone().contiguous()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone().contiguous()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(t: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    return _AllReduceSum.apply(t)


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    return _AllGather.apply(t)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """Where collectives on plain tensors must live: NCCL only reduces CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a (small, e.g. metric) tensor on any device; returned on the input's device."""
    if world()[1] == 1:
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf)
    return (buf / world()[1]).to(t.device)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks, for a tensor on any device (staged through the backend's device)."""
    if world()[1] > 1:
        buf = t.to(_comm_device())
        dist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
    return t


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def agree(fn, what: str):
    """Collective: every rank runs its part `fn` (which may do nothing on some ranks), then all
    share the outcome. A failure anywhere raises on every rank, naming the rank and the error,
    instead of leaving the others blocked in the next barrier. Returns this rank's result."""
    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    if world()[1] > 1:
        failures = [m for m in all_gather_object(None if error is None else f"{type(error).__name__}: {error}")]
        if error is None and any(failures):
            r = next(i for i, m in enumerate(failures) if m)
            raise RuntimeError(f"{what} failed on rank {r}: {failures[r]}")
    if error is not None:
        raise error
    return result


def all_gather_object(obj) -> list:
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 of every full parameter and buffer of this rank's replica (ZeRO-3 shards gathered first).

    Collective under ZeRO-3. Equal digests on all ranks prove the replicas are identical.
    """
    import hashlib

    params = list(module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    h = hashlib.sha256()
    with ctx:
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def sum_counters(counters: dict) -> dict:
    """Add up numeric counters (e.g. skipped samples) over all ranks."""
    parts = all_gather_object(dict(counters))
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v if isinstance(v, (int, float)) else v
    return out
