"""Cross-rank pieces of SimMTM on real gloo process groups (2 processes) vs one process.

The gathered constraint loss, global aggregation and the global BatchNorm must equal one process
on the concatenated batch: loss and every parameter gradient (after DeepSpeed-style averaging).
Tolerance: 1e-5 relative on the loss, 1e-4 relative / 1e-6 absolute on gradients (fp32; only
summation order differs).
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

from models import Gather, SimMTM, SimMTMConfig
from models.masking import make_views
from trainer import distributed as D

from .launch_utils import free_port

CFG = dict(seq_len=24, d_model=8, n_heads=2, e_layers=1, d_ff=16, proj_dim=8, dropout=0.0, num_views=3)
B, C, L = 2, 2, 24


def _inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, C, L, generator=g)
    _, keep = make_views(x.reshape(B * C, L), CFG["num_views"], 0.5, 3.0, generator=g)
    return x, keep


def _worker(rank: int, world: int, port: int, out_dir: str, global_agg: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = SimMTM(SimMTMConfig(**CFG))
        x, keep = _inputs(rank)
        gather = Gather(D.all_gather_with_grad, rank, world, D.all_reduce_with_grad)
        out = model(x, gather=gather, keep=keep, global_aggregation=global_agg)
        out["loss"].backward()
        grads = {n: D.all_reduce_mean(p.grad) for n, p in model.named_parameters()}
        result = {"loss": D.all_reduce_mean(out["loss"].detach()), "loss_cl": D.all_reduce_mean(out["loss_cl"]),
                  "grads": grads, "running_mean": model.projector.bn.running_mean.clone()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _single(global_agg_equivalent: bool = True):
    torch.manual_seed(0)
    model = SimMTM(SimMTMConfig(**CFG))
    xs, keeps = zip(*[_inputs(r) for r in range(2)])
    x = torch.cat(xs, 0)
    n0 = B * C
    # rows of the concatenated batch: [originals of both ranks; view 1 of both; ...]
    keep = torch.cat([torch.cat([k[v * n0:(v + 1) * n0] for k in keeps], 0) for v in range(CFG["num_views"] + 1)], 0)
    out = model(x, keep=keep)
    out["loss"].backward()
    return out, {n: p.grad for n, p in model.named_parameters()}, model


def _run(tmp_path, global_agg: bool):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), global_agg), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_gathered_loss_and_global_aggregation_equal_one_process(tmp_path):
    ranks = _run(tmp_path, global_agg=True)
    out, grads, model = _single()
    for r in ranks:
        assert torch.allclose(r["loss"], out["loss"], rtol=1e-5)
        assert torch.allclose(r["loss_cl"], out["loss_cl"], rtol=1e-5)
        for name, g in grads.items():
            assert torch.allclose(r["grads"][name], g, rtol=1e-4, atol=1e-6), name
        # global BatchNorm: identical running statistics on every rank, equal to one process
        assert torch.allclose(r["running_mean"], model.projector.bn.running_mean, atol=1e-6)


def test_gathered_constraint_with_local_aggregation(tmp_path):
    ranks = _run(tmp_path, global_agg=False)
    out, _, _ = _single()
    # The constraint loss spans the global batch either way; the reconstruction then aggregates
    # over each rank's own rows only (cheaper), so only the constraint term must match.
    for r in ranks:
        assert torch.allclose(r["loss_cl"], out["loss_cl"], rtol=1e-5)
    assert torch.equal(ranks[0]["grads"]["encoder.embed.weight"], ranks[1]["grads"]["encoder.embed.weight"])


def test_slurm_nodelist_expansion_and_discovery():
    assert D.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert D.expand_nodelist("node7") == ["node7"]
    assert D.expand_nodelist("rack[1-2]-n[01-02],x") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02", "x"]
    # a job step on a subset of the allocation (srun --nodelist): the step's first node and task count
    env = D.discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8",
                      "SLURM_JOB_NODELIST": "n[10-11]", "SLURM_STEP_NODELIST": "n11", "SLURM_JOB_ID": "1"})
    assert (env.world_size, env.master_addr) == (8, "n11")
    env = D.discover({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "n[10-11]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (3, 8, 1, "n10", "slurm")
    assert env.master_port == 20000 + 4242
    env = D.discover({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "123"})
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (1, 2, "h", 123)
    env = D.discover({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        D.discover({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


def _python(code: str):
    """Run a snippet in a fresh interpreter (its exit is what is under test)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


EXIT_SCRIPT = r"""
import atexit, os, sys
import torch, torch.distributed as dist
from trainer import distributed as D
atexit.register(lambda: print("finalised", flush=True))
if {with_group}:
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    dist.all_reduce(torch.ones(2))  # starts the group's worker threads
    dist.new_group([0])             # a group only C++ still holds after destroy_process_group, like DeepSpeed's
threads = sum(open(f"/proc/self/task/{{t}}/comm").read().startswith("pt_gloo") for t in os.listdir("/proc/self/task"))
print("threads", threads, end=" ")  # left in the buffer: exit_process must flush it
sys.stdout.write("buffered")
D.exit_process(3)
"""


@pytest.mark.parametrize("with_group", [True, False])
def test_exit_process_flushes_and_keeps_the_code(with_group):
    """A process that ran a group ends at once (no finalisation: the atexit line is not printed)
    after flushing; one that did not exits normally. The exit code is kept either way."""
    p = _python(EXIT_SCRIPT.format(with_group=with_group, port=free_port()))
    assert p.returncode == 3, p.stderr
    assert "buffered" in p.stdout
    if with_group:
        assert int(p.stdout.split()[1]) > 0 and "finalised" not in p.stdout
    else:
        assert p.stdout.startswith("threads 0") and "finalised" in p.stdout
