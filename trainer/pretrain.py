"""SimMTM pre-training. The same file runs under `python`, `torchrun`, `deepspeed` and `srun`:

    python trainer/pretrain.py [--config configs/etth1.yaml] [key=value ...]
    deepspeed --num_gpus 2 trainer/pretrain.py --config configs/etth1.yaml
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from data_pipeline import build_loader
from models import Gather, SimMTM
from trainer import checkpoint
from trainer import distributed as dist
from trainer.config import REPO_ROOT, Config, load_config, split_cli, to_dict
from trainer.engine import build_engine
from trainer.monitor import Monitor, Throughput, peak_memory_gb


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def find_resume(cfg: Config) -> tuple[Path, Optional[str]]:
    """(checkpoint folder, tag to resume from or None) for ckpt.resume = none | auto | <path>."""
    ckpt_dir = Path(cfg.ckpt.dir) / "checkpoints"
    if cfg.ckpt.resume == "none":
        return ckpt_dir, None
    if cfg.ckpt.resume == "auto":
        tag = checkpoint.latest_tag(ckpt_dir)
        if cfg.ckpt.remote:  # the mirror may hold a newer checkpoint (e.g. node-local disks were lost)
            remote = checkpoint.remote_latest(cfg.ckpt.remote, cfg.ckpt.storage_options)
            if remote is not None and (tag is None or remote > tag):
                checkpoint.download(cfg.ckpt.remote, remote, ckpt_dir, cfg.ckpt.storage_options,
                                    dist.discover().local_rank)
                tag = remote
        return ckpt_dir, tag
    p = Path(cfg.ckpt.resume)
    if not p.is_dir():
        raise checkpoint.CheckpointError(f"ckpt.resume: {p} is not a checkpoint folder")
    return p.parent, p.name


def resolve_paths(cfg: Config) -> None:
    """Repo-relative defaults (data/ETTh1.csv, the data/shards cache) work from any working directory."""
    src = Path(cfg.data.source)
    if "://" not in cfg.data.source and not src.is_absolute() and not src.exists() and (REPO_ROOT / src).exists():
        cfg.data.source = str(REPO_ROOT / src)
    if "://" not in cfg.data.cache_dir and not Path(cfg.data.cache_dir).is_absolute():
        cfg.data.cache_dir = str(REPO_ROOT / cfg.data.cache_dir)


def train(cfg: Config) -> dict:
    """Run pre-training as configured; returns the summary (on every rank)."""
    resolve_paths(cfg)
    resume_dir, resume_tag = find_resume(cfg)
    saved = checkpoint.read_state(resume_dir, resume_tag) if resume_tag else None
    world = dist.discover().world_size
    use_ds = cfg.dist.deepspeed or world > 1 or (saved is not None and saved["engine"] == "deepspeed")
    cfg.dist.deepspeed = use_ds
    env = dist.setup(cfg.dist.backend, use_deepspeed=use_ds)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed + env.rank)

    loader = build_loader(cfg.data, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size,
                          rank=env.rank, world_size=env.world_size, seed=cfg.train.seed)
    steps_per_epoch = max(1, len(loader) // cfg.train.grad_accum)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = SimMTM(cfg.model)
    torch.manual_seed(cfg.train.seed + env.rank)  # then per-rank streams (dropout)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    # A ZeRO checkpoint written at another world size loads through DeepSpeed's universal format.
    resized = saved is not None and saved["world_size"] != env.world_size
    universal = resized and saved["engine"] == "deepspeed" and saved.get("zero_stage", 0) > 0
    engine, ds_config = build_engine(model, cfg, env.device, total, load_universal=universal)
    generator = torch.Generator(device=env.device).manual_seed(cfg.train.seed * 1000 + env.rank)
    reduce = dist.all_reduce_with_grad if env.distributed else None  # projector BN over the global batch
    gather = Gather(dist.all_gather_with_grad, env.rank, env.world_size, reduce) if cfg.dist.global_constraint \
        else Gather(reduce=reduce)

    step, epoch, history = 0, 0, []
    ckpt_dir = Path(cfg.ckpt.dir) / "checkpoints"
    resume_note = ""
    if saved is not None:
        checkpoint.load(engine, resume_dir, checkpoint.to_universal(resume_dir, resume_tag) if universal else resume_tag)
        if universal:
            checkpoint.restore_buffers(engine.module, resume_dir, resume_tag)
        step, epoch, history = saved["step"], saved["epoch"], saved["history"]
        if not resized:  # exact continuation: this rank's data position and RNG streams
            mine = checkpoint.load_rank_state(resume_dir, resume_tag, env.rank)
            checkpoint.set_rng_state(mine["rng"], generator)
            loader.load_state_dict(mine["data"])
            resume_note = f", resumed from {resume_tag} at step {step}"
        else:  # new world size: same weights/optimizer; the data order restarts this epoch
            generator.manual_seed(cfg.train.seed * 1000 + env.rank + 7919 * step)
            torch.manual_seed(cfg.train.seed + env.rank + 7919 * step)
            resume_note = (f", resumed from {resume_tag} (saved with {saved['world_size']} ranks) at step {step}: "
                           f"epoch {epoch} restarts with this world size's data order")

    monitor = Monitor(env.is_main, cfg.ckpt.dir, total, cfg.train.progress, cfg.log.tensorboard)
    monitor.print(f"simmtm: {n_params / 1e6:.1f}M parameters, "
                  f"{env.world_size} rank(s) [{env.launcher}] on {env.device}, "
                  f"engine={'deepspeed' if use_ds else 'torch'}, {total} steps ({steps_per_epoch}/epoch), "
                  f"batch {cfg.train.batch_size} x {cfg.train.grad_accum} accum"
                  + resume_note)
    if env.is_main:
        Path(cfg.ckpt.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.ckpt.dir) / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        (Path(cfg.ckpt.dir) / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    def save(at_step: int) -> Path:
        shared = {"step": at_step, "epoch": epoch, "history": history, "config": to_dict(cfg),
                  "world_size": env.world_size, "engine": "deepspeed" if use_ds else "torch",
                  "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0) if use_ds else 0}
        per_rank = {"rng": checkpoint.rng_state(generator), "data": loader.state_dict()}
        folder = checkpoint.save(engine, ckpt_dir, at_step, shared, per_rank, cfg.ckpt.keep)
        if cfg.ckpt.remote:
            checkpoint.upload(folder, cfg.ckpt.remote, cfg.ckpt.storage_options, env.local_rank, cfg.ckpt.keep)
        return folder

    meter = Throughput()
    engine.train()
    acc = {"loss": 0.0, "loss_rec": 0.0, "loss_cl": 0.0}
    micro = 0
    last_saved = None
    wait_mark = loader.wait_seconds
    while step < total:
        loader.set_epoch(epoch)
        for batch in loader:
            wait = loader.wait_seconds - wait_mark
            x = batch.to(env.device, non_blocking=True)
            want_image = cfg.log.image_every > 0 and (step + 1) % cfg.log.image_every == 0 and env.is_main
            out = engine(x, gather=gather, generator=generator,
                         global_aggregation=cfg.dist.global_aggregation, details=want_image)
            lr = engine.get_lr()[0]  # the rate this step uses
            engine.backward(out["loss"])
            engine.step()
            for k in acc:
                acc[k] += float(out[k].detach()) / cfg.train.grad_accum
            micro += 1
            meter.add(out["num_series"] * env.world_size, out["num_series"] * x.shape[-1] * env.world_size, wait)
            wait_mark = loader.wait_seconds
            if micro % cfg.train.grad_accum:
                continue
            step += 1
            means = {k: float(dist.all_reduce_mean(torch.tensor(v))) for k, v in acc.items()}
            acc = {k: 0.0 for k in acc}
            rates = meter.rates()
            record = {"step": step, **means, "lr": lr, "series_per_s": rates["series_per_s"],
                      "time_s": meter.elapsed}
            if step == 1 or step % cfg.train.log_every == 0 or step == total:
                history.append(record)
                monitor.print(f"step {step}/{total} loss {means['loss']:.4f} rec {means['loss_rec']:.4f} "
                              f"cl {means['loss_cl']:.4f} lr {record['lr']:.2e} {rates['series_per_s']:.1f} series/s")
            gn = engine.get_global_grad_norm()
            monitor.scalars(step, {"loss/total": means["loss"], "loss/reconstruction": means["loss_rec"],
                                   "loss/constraint": means["loss_cl"], "weight/sigma_rec": float(out["sigma_rec"]),
                                   "weight/sigma_cl": float(out["sigma_cl"]), "lr": record["lr"],
                                   "grad_norm": float(gn) if gn is not None else float("nan"),
                                   "throughput/series_per_s": rates["series_per_s"],
                                   "throughput/points_per_s": rates["points_per_s"],
                                   "data/wait_fraction": rates["data_wait_fraction"],
                                   "memory/peak_gb": peak_memory_gb(env.device)})
            if want_image:
                monitor.reconstruction_image(step, x[0].float(), out["pred"][0], out["weights"])
            monitor.step(step, {"loss": f"{means['loss']:.3f}", "rec": f"{means['loss_rec']:.3f}",
                                "series/s": f"{rates['series_per_s']:.0f}"})
            if cfg.ckpt.every > 0 and step % cfg.ckpt.every == 0 and step < total:
                last_saved = save(step)
            if step >= total:
                break
        else:
            epoch += 1
            continue
        break
    loader.close()  # join its threads now rather than when the collector or the exit hook gets to them

    # The final state, unless it is exactly the checkpoint this run resumed from (a finished run
    # started again): writing over the checkpoint `latest` names would put it at risk for nothing.
    if saved is None or step != saved["step"]:
        last_saved = save(step)
    else:
        last_saved = resume_dir / resume_tag
    digests = dist.all_gather_object(dist.parameter_digest(engine.module))
    data_stats = dist.sum_counters(loader.stats)
    rates = meter.rates()
    summary = {"steps": step, "epochs_started": epoch + 1, "first": history[0] if history else None,
               "last": history[-1] if history else None, "series_per_s": rates["series_per_s"],
               "points_per_s": rates["points_per_s"], "data_wait_fraction": rates["data_wait_fraction"],
               "peak_memory_gb": peak_memory_gb(env.device), "elapsed_s": meter.elapsed,
               "world_size": env.world_size, "checkpoint": str(last_saved), "data_stats": data_stats,
               "replicas_identical": len(set(digests)) == 1, "parameter_digests": digests,
               "history": history}
    monitor.hparams(_flatten(to_dict(cfg)), {"final/loss_rec": summary["last"]["loss_rec"] if history else 0.0})
    monitor.close()
    dist.release_engine(engine)
    if env.is_main:
        if cfg.ckpt.publish:
            from trainer.publish import publish

            publish(last_saved, cfg.ckpt.publish, include_heads=cfg.ckpt.publish_heads,
                    storage_options=cfg.ckpt.storage_options or cfg.data.storage_options)
            summary["published"] = cfg.ckpt.publish
        (Path(cfg.ckpt.dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    first, last = s["first"] or {}, s["last"] or {}
    drop = 100.0 * (1 - last.get("loss_rec", 0) / first["loss_rec"]) if first.get("loss_rec") else float("nan")
    rows = [("steps", f"{s['steps']}"),
            ("reconstruction loss", f"{first.get('loss_rec', float('nan')):.4f} -> {last.get('loss_rec', float('nan')):.4f}"
             f" ({drop:.1f}% lower)"),
            ("constraint loss", f"{first.get('loss_cl', float('nan')):.4f} -> {last.get('loss_cl', float('nan')):.4f}"),
            ("total loss", f"{first.get('loss', float('nan')):.4f} -> {last.get('loss', float('nan')):.4f}"),
            ("throughput", f"{s['series_per_s']:.1f} series/s, {s['points_per_s']:.0f} points/s"),
            ("data wait", f"{100 * s['data_wait_fraction']:.2f}% of wall time"),
            ("peak memory", f"{s['peak_memory_gb']:.2f} GB"),
            ("wall time", f"{s['elapsed_s']:.1f} s on {s['world_size']} rank(s)"),
            ("data", json.dumps(s["data_stats"])),
            ("replicas identical", f"{s['replicas_identical']} ({s['world_size']} rank(s))"),
            ("checkpoint", s["checkpoint"])] + ([("published", s["published"])] if s.get("published") else [])
    width = max(len(r[0]) for r in rows)
    print("\n== SimMTM pre-training summary ==")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict:
    path, overrides = split_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(path, overrides)
    try:
        return train(cfg)
    finally:
        dist.teardown()


if __name__ == "__main__":
    from trainer.config import ConfigError

    try:
        main()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        dist.exit_process(2)
    dist.exit_process(0)
