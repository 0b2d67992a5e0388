"""Issue 13, the CUDA training path checked on the CPU where its logic allows: no host read between
log steps, the non-finite guard deciding on the device, fused Adam chosen on CUDA and handed to
DeepSpeed, the loader -> device feed, train.compile. The `gpu` tests run the same on CUDA."""
import threading
from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file

import trainer.engine as engine_mod
import trainer.pretrain as pretrain_mod
from data_pipeline import DataConfig, build_loader, to_device
from models import SimMTM
from trainer.config import load_config
from trainer.engine import NonFiniteError, build_optimizer, fused_adam, kernels_kept, torch_optimizer
from trainer.pretrain import main

from .launch_utils import TINY

LOSSES = ("loss", "loss_rec", "loss_cl")
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")


def pretrain(out, *extra):
    return main(["--config", "configs/etth1_cpu.yaml", *TINY, "train.max_steps=10", f"ckpt.dir={out}",
                 "log.tensorboard=false", "log.image_every=0", *extra])


def fused_everywhere(monkeypatch):
    """The CUDA choice on the CPU: torch's fused Adam (CPU kernel), so the guard decides on the device."""
    monkeypatch.setattr(engine_mod, "fused_adam", lambda device: True)


def count_training_forwards(monkeypatch) -> dict:
    """{"n": training forwards of SimMTM so far}, kept current while the test runs."""
    seen = {"n": 0}
    forward = SimMTM.forward

    def counted(self, *args, **kwargs):
        seen["n"] += self.training
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SimMTM, "forward", counted)
    return seen


def reads_per_step(monkeypatch) -> dict:
    """{training forward number: [host reads by the main thread after it]}: Tensor -> Python reads,
    counted by the step whose forward ran last (0: before the first)."""
    seen, reads = count_training_forwards(monkeypatch), defaultdict(list)
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            if threading.current_thread() is threading.main_thread():
                reads[seen["n"]].append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


# ----------------------------------------------------------------------------- no host read per step

def test_the_loop_reads_the_device_at_log_steps_only(tmp_path, monkeypatch):
    """log_every=5 over 10 steps: one host read (a single .tolist()) at step 5, none at steps 2-4 and
    6-9; step 1 and the last step are log steps too (and the end of the run reads for the summary).
    Bernoulli masks: the geometric mask's top-up check is a host read on the CPU only."""
    fused_everywhere(monkeypatch)
    reads = reads_per_step(monkeypatch)
    pretrain(tmp_path, "train.log_every=5", "model.mask=bernoulli")
    assert {n: r for n, r in reads.items() if n not in (0, 1, 5, 10)} == {}
    assert reads[5] == ["tolist"]


@pytest.mark.parametrize("fused", [False, True])
def test_logging_less_often_changes_no_number(tmp_path, monkeypatch, fused):
    """The records at steps 1, 5, 10 and the final weights are those of a run logging every step
    (steps 4 and 8 are read for their saves, not logged)."""
    if fused:
        fused_everywhere(monkeypatch)
    every = pretrain(tmp_path / "a", "train.log_every=1", "ckpt.every=4")
    sparse = pretrain(tmp_path / "b", "train.log_every=5", "ckpt.every=4")
    assert [h["step"] for h in sparse["history"]] == [1, 5, 10]
    overlap = {h["step"]: h for h in every["history"] if h["step"] in (1, 5, 10)}
    for h in sparse["history"]:
        assert [h[k] for k in (*LOSSES, "lr")] == [overlap[h["step"]][k] for k in (*LOSSES, "lr")]
    assert sparse["parameter_digests"] == every["parameter_digests"]


@pytest.mark.usefixtures("restore_env")
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_nonfinite_update_between_log_steps_is_dropped_on_the_device_and_named(tmp_path, monkeypatch, engine):
    """The NaN loss of step 3 is noticed at step 4 (a save step): the error names step 3 and the last
    good checkpoint, nothing after it is saved, and the NaN update never reached the weights."""
    fused_everywhere(monkeypatch)
    engines, build = [], pretrain_mod.build_engine

    def kept(*args, **kwargs):
        built, ds = build(*args, **kwargs)
        engines.append(built)
        return built, ds

    forward, seen = SimMTM.forward, {"n": 0}

    def nan_at_step_3(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        seen["n"] += self.training
        if self.training and seen["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(pretrain_mod, "build_engine", kept)
    monkeypatch.setattr(SimMTM, "forward", nan_at_step_3)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3; stopped, .*last good checkpoint is "
                                             r".*step_00000002"):
        pretrain(tmp_path, "train.log_every=5", "ckpt.every=2", "ckpt.keep=0",
                 f"dist.deepspeed={str(engine == 'deepspeed').lower()}")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert seen["n"] == 4  # it ran on to the next read, no further
    assert all(bool(torch.isfinite(p).all()) for p in engines[0].module.parameters())
    assert isinstance(torch_optimizer(engines[0]).found_inf, torch.Tensor)  # decided by the fused kernel


# ----------------------------------------------------------------------------- fused Adam

def _ds(**params) -> dict:
    return {"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                     "weight_decay": 0.0, "torch_adam": True, **params}}}


def test_fused_adam_is_chosen_on_cuda_only():
    assert fused_adam(torch.device("cuda", 0)) and not fused_adam(torch.device("cpu"))
    params = [torch.nn.Parameter(torch.ones(3))]
    on_cuda = build_optimizer(_ds(), params, torch.device("cuda"))  # the choice; the CPU params are fine for it
    on_cpu = build_optimizer(_ds(), params, torch.device("cpu"))
    assert type(on_cuda) is torch.optim.Adam and on_cuda.param_groups[0]["fused"] is True
    assert not on_cpu.param_groups[0]["fused"] and on_cpu.param_groups[0]["foreach"] is None
    assert type(build_optimizer(_ds(adam_w_mode=True), params, torch.device("cpu"))) is torch.optim.AdamW
    assert not build_optimizer(_ds(foreach=True), params, torch.device("cuda")).param_groups[0]["fused"]
    with pytest.raises(ValueError, match="optimizer params: .*momentum"):
        build_optimizer(_ds(momentum=0.9), params, torch.device("cpu"))


@pytest.mark.usefixtures("restore_env")
def test_deepspeed_steps_our_torch_optimizer_inside_zero():
    from trainer import distributed as dist
    from trainer.engine import build_engine

    cfg = load_config(None, [*TINY, "dist.deepspeed=true", "dist.zero_stage=2"])
    dist.setup("auto", use_deepspeed=True)
    engine, ds = build_engine(SimMTM(cfg.model), cfg, torch.device("cpu"), 10)
    try:
        assert type(torch_optimizer(engine)) is torch.optim.Adam and engine.optimizer is not torch_optimizer(engine)
        assert ds["optimizer"]["type"] == "Adam"  # still recorded in the run's ds_config.json
    finally:
        engine.destroy()


@pytest.mark.parametrize("saved_fused", [False, True])
def test_loading_optimizer_state_keeps_this_runs_kernel(saved_fused):
    """A checkpoint written with the other kernel (CPU <-> CUDA) loads into the one this run chose."""
    def adam(fused):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.Adam([p], lr=0.1, fused=fused or None)
        p.grad = torch.ones(3)
        opt.step()
        return opt

    saved, now = adam(saved_fused), adam(not saved_fused)
    with kernels_kept(now):
        now.load_state_dict(saved.state_dict())
    group = now.param_groups[0]
    assert bool(group["fused"]) is (not saved_fused)
    step = now.state[group["params"][0]]["step"]
    assert step.dtype == torch.float32 and float(step) == 1.0
    now.param_groups[0]["params"][0].grad = torch.ones(3)
    now.step()  # runs with the kept kernel


# ----------------------------------------------------------------------------- loader -> device

def _loader(pin=False):
    cfg = DataConfig(source="data/ETTh1.csv", window_stride=64)
    return build_loader(cfg, seq_len=48, batch_size=4, seed=0, pin_memory=pin)


def test_to_device_yields_the_loaders_batches_in_order():
    a, b = _loader(), _loader()
    try:
        plain, fed = list(a), list(to_device(b, torch.device("cpu")))
        assert len(fed) == len(plain) > 5 and all(torch.equal(x, y) for x, y in zip(plain, fed))
        assert b.state_dict() == a.state_dict()  # nothing fetched ahead: the resume state is the trained one
    finally:
        a.close(), b.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_reach_the_gpu_in_order():
    a, b = _loader(), _loader(pin=True)
    try:
        plain = list(a)
        fed = [x.cpu() for x in to_device(b, torch.device("cuda"))]
        assert len(fed) == len(plain) and all(torch.equal(x, y) for x, y in zip(plain, fed))
    finally:
        a.close(), b.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cuda_synchronisation_between_log_steps(tmp_path, monkeypatch):
    """torch's sync debug mode warns at every synchronising CUDA call (blocking copies, .item(), ...):
    with log_every=5 over 10 steps none may come from steps 2-4 or 6-9 (plain engine, fp32)."""
    import warnings

    seen, where = count_training_forwards(monkeypatch), defaultdict(list)
    shown = warnings.showwarning

    def record(message, category, filename, lineno, *args, **kwargs):
        if "synchroniz" in str(message):
            where[seen["n"]].append(f"{filename}:{lineno}")
        else:
            shown(message, category, filename, lineno, *args, **kwargs)

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            monkeypatch.setattr(warnings, "showwarning", record)
            pretrain(tmp_path, "train.log_every=5")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert {n: w for n, w in where.items() if n not in (0, 1, 5, 10)} == {}


# ----------------------------------------------------------------------------- train.compile

def test_compiled_training_matches_eager(tmp_path):
    """train.compile=true (inductor, here its CPU backend): the same losses within 1e-5 for 3 steps."""
    eager = pretrain(tmp_path / "eager", "train.max_steps=3")
    try:
        compiled = pretrain(tmp_path / "compiled", "train.max_steps=3", "train.compile=true")
    finally:
        torch._dynamo.reset()
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        assert a["step"] == b["step"] and all(abs(a[k] - b[k]) <= 1e-5 for k in LOSSES), (a, b)
    # compiled in place: the checkpoint holds the eager module's keys, so evaluation and resume read it
    keys = [load_file(str(tmp_path / run / "checkpoints" / "step_00000003" / "model.safetensors")).keys()
            for run in ("eager", "compiled")]
    assert keys[0] == keys[1]


def test_adam_w_mode_picks_adamw_whatever_the_type():
    """DeepSpeed's `adam_w_mode` switch is consumed, not passed on to torch (which would reject it)."""
    from trainer.engine import build_optimizer

    params = list(torch.nn.Linear(2, 2).parameters())
    for kind, want in (("AdamW", torch.optim.AdamW), ("Adam", torch.optim.AdamW)):
        ds = {"optimizer": {"type": kind, "params": {"lr": 1e-3, "adam_w_mode": True}}}
        assert type(build_optimizer(ds, params, torch.device("cpu"))) is want
    assert type(build_optimizer({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, params,
                                torch.device("cpu"))) is torch.optim.Adam
