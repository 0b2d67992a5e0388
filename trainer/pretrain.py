"""SimMTM pre-training. The same file runs under `python`, `torchrun`, `deepspeed` and `srun`:

    python trainer/pretrain.py [--config configs/etth1.yaml] [key=value ...]
    deepspeed --num_gpus 2 trainer/pretrain.py --config configs/etth1.yaml
"""
from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from data_pipeline import build_loader, to_device
from models import Gather, SimMTM
from trainer import checkpoint, runs
from trainer import distributed as dist
from trainer.config import REPO_ROOT, Config, ConfigError, load_config, split_cli, to_dict
from trainer.engine import NonFiniteGuard, build_engine, compile_model, epoch_cosine, step_unless_nonfinite
from trainer.monitor import Monitor, Throughput, peak_memory_gb


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def constraint_bounds(num_views: int, num_series: int) -> dict:
    """Reference values of the constraint loss for M = num_views positives per row among N = num_series
    rows (global): every row's softmax over the N-1 others, summed over its M positives.

    perfect grouping (each group's members identical, groups apart, tau -> 0): the mass splits evenly
    over the M positives, M ln M; chance (all representations alike): uniform over N-1, M ln(N-1).
    """
    m, n = int(num_views), int(num_series)
    return {"num_views": m, "num_series": n, "perfect": m * math.log(m) if m > 0 else 0.0,
            "chance": m * math.log(n - 1) if n > 1 else float("nan")}


def constraint_formed(loss: float, bounds: dict) -> float:
    """(chance - L) / (chance - perfect): 0 at chance, 1 at perfect grouping."""
    span = bounds["chance"] - bounds["perfect"]
    return (bounds["chance"] - loss) / span if span > 0 else float("nan")


def epoch_cosine_lambda(cfg: Config, steps_per_epoch: int, total: int):
    """optim.schedule=epoch_cosine: step -> multiplier (None for the JSON's warmup-cosine)."""
    if cfg.optim.schedule != "epoch_cosine":
        return None
    epochs = cfg.train.epochs if cfg.train.max_steps <= 0 else math.ceil(total / steps_per_epoch)
    floor = cfg.optim.min_lr_ratio
    return lambda s: epoch_cosine(s, steps_per_epoch, epochs, floor)


def val_seed(cfg: Config, rank: int) -> int:
    """The mask seed of every validation: identical at every validation, distinct per rank."""
    return cfg.train.seed + 17 + 7919 * rank


def load_val_batches(cfg: Config, rank: int, world_size: int) -> list:
    """The first train.val_batches batches of this rank's share of the validation split (not shuffled,
    finite), kept on the CPU; the same count on every rank. Collective (agrees on the count)."""
    data = replace(cfg.data, split=cfg.train.val_split, shuffle=False, infinite=False)
    loader = build_loader(data, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size, rank=rank,
                          world_size=world_size, seed=cfg.train.seed)
    batches = []
    try:
        for batch in loader:
            batches.append(batch.clone())
            if len(batches) >= cfg.train.val_batches:
                break
    finally:
        loader.close()
    n = min(dist.all_gather_object(len(batches)))
    if n == 0:
        raise ValueError(f"train.val_every: the {cfg.train.val_split!r} split of {cfg.data.source} gives no batch "
                         f"of {cfg.train.batch_size} windows of {cfg.model.seq_len} per rank")
    return batches[:n]


def validate(engine, batches: list, gather: Gather, cfg: Config, device: torch.device, rank: int) -> dict:
    """Mean losses over the cached validation batches, in eval mode, masks from a freshly seeded
    generator, averaged over ranks. Leaves the weights, buffers and every training RNG stream as
    they were (collective)."""
    rng = checkpoint.rng_state(None)
    module = engine if isinstance(engine, torch.nn.Module) else engine.module  # DeepSpeed's engine or plain
    was_training = module.training
    module.eval()
    generator = torch.Generator(device=device).manual_seed(val_seed(cfg, rank))
    keys = ("loss", "loss_rec", "loss_cl")
    sums = None  # on the device, fp64 (as Python adds them): read once, at the end
    try:
        with torch.no_grad():
            for batch in batches:
                out = engine(batch.to(device), gather=gather, generator=generator,
                             global_aggregation=cfg.dist.global_aggregation)
                part = torch.stack([out[k].detach() for k in keys]).double()
                sums = part if sums is None else sums + part
    finally:
        module.train(was_training)
        checkpoint.set_rng_state(rng, None)
    means = dist.all_reduce_mean(sums / len(batches)).tolist()
    return {f"val_{k}": v for k, v in zip(keys, means)}


def resolve_paths(cfg: Config) -> None:
    """Repo-relative defaults (data/ETTh1.csv, the data/shards cache) work from any working directory."""
    src = Path(cfg.data.source)
    if "://" not in cfg.data.source and not src.is_absolute() and not src.exists() and (REPO_ROOT / src).exists():
        cfg.data.source = str(REPO_ROOT / src)
    if "://" not in cfg.data.cache_dir and not Path(cfg.data.cache_dir).is_absolute():
        cfg.data.cache_dir = str(REPO_ROOT / cfg.data.cache_dir)


def train(cfg: Config) -> dict:
    """Run pre-training as configured; returns the summary (on every rank)."""
    if cfg.train.val_every > 0 and (cfg.train.val_split == "test" or cfg.train.val_split == cfg.data.split):
        raise ConfigError(f"train.val_split={cfg.train.val_split!r}: the best checkpoint must be chosen on held-back "
                          f"data, not on the {'test' if cfg.train.val_split == 'test' else 'training'} split")
    resolve_paths(cfg)
    run_dir, ckpt_dir = Path(cfg.ckpt.dir), Path(cfg.ckpt.dir) / "checkpoints"
    resume_dir, resume_tag = runs.find_resume(cfg)
    saved = checkpoint.read_state(resume_dir, resume_tag) if resume_tag else None
    if saved is not None and not saved.get("resumable", True):
        raise checkpoint.CheckpointError(
            f"{resume_dir / resume_tag}: holds weights only (ckpt.save_optimizer_every), so training cannot "
            f"continue from it exactly; resume from a checkpoint saved with its optimizer state")
    world = dist.discover().world_size
    use_ds = cfg.dist.deepspeed or world > 1 or (saved is not None and saved["engine"] == "deepspeed")
    cfg.dist.deepspeed = use_ds
    # settings the checkpoint cannot honour are refused before any process group exists
    changes = runs.config_changes(saved["config"], to_dict(cfg), saved["step"]) if saved is not None else []
    env = dist.setup(cfg.dist.backend, use_deepspeed=use_ds)
    run_note = ""
    if cfg.ckpt.overwrite and (saved is None or resume_dir.resolve() != ckpt_dir.resolve()):
        gone = dist.agree(lambda: runs.clear(run_dir) if env.is_main else [], f"clearing {run_dir}")
        run_note = f", replacing the run in {run_dir} (removed {', '.join(gone)})" if gone else ""
    elif saved is not None and resume_dir.resolve() == ckpt_dir.resolve():
        aside = dist.agree(lambda: runs.branch(ckpt_dir, resume_tag, cfg.ckpt.remote, cfg.ckpt.storage_options)
                           if env.is_main else None,
                           f"branching {ckpt_dir} at {resume_tag}")
        if aside is not None:
            run_note = f", a new branch from {resume_tag}: the newer checkpoints moved to {aside}"
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed + env.rank)

    loader = build_loader(cfg.data, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size,
                          rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
                          pin_memory=env.device.type == "cuda")
    steps_per_epoch = max(1, len(loader) // cfg.train.grad_accum)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = SimMTM(cfg.model)
    torch.manual_seed(cfg.train.seed + env.rank)  # then per-rank streams (dropout)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    # A ZeRO checkpoint written at another world size loads through DeepSpeed's universal format.
    resized = saved is not None and saved["world_size"] != env.world_size
    universal = resized and saved["engine"] == "deepspeed" and saved.get("zero_stage", 0) > 0
    engine, ds_config = build_engine(model, cfg, env.device, total, load_universal=universal,
                                     lr_lambda=epoch_cosine_lambda(cfg, steps_per_epoch, total))
    if cfg.train.compile:
        compile_model(engine)
    generator = torch.Generator(device=env.device).manual_seed(cfg.train.seed * 1000 + env.rank)
    reduce = dist.all_reduce_with_grad if env.distributed else None  # projector BN over the global batch
    gather = Gather(dist.all_gather_with_grad, env.rank, env.world_size, reduce) if cfg.dist.global_constraint \
        else Gather(reduce=reduce)

    step, epoch, history = 0, 0, []
    resume_note = ""
    best = None  # {"tag", "step", "val_loss"}: the checkpoint with the lowest validation loss so far
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
        # The best so far as of the resumed checkpoint; its pointer is put back to match (a rollback
        # may have left one naming a checkpoint of the abandoned timeline). A best held in another
        # run's folder (ckpt.resume=<path> elsewhere) does not carry over: selection starts afresh.
        same_dir = resume_dir.resolve() == ckpt_dir.resolve()
        best = saved.get("best") if same_dir else None
        if best is not None and not (ckpt_dir / best["tag"] / checkpoint.COMPLETE).exists():
            best = None
        # always rewritten: resuming from another folder must not leave this folder's stale pointer behind
        dist.agree(lambda: checkpoint.set_best(ckpt_dir, best["tag"] if best else None) if env.is_main else None,
                   f"restoring {ckpt_dir / checkpoint.BEST}")
        if best is not None:
            resume_note += f" (best so far: {best['tag']}, val loss {best['val_loss']:.4f})"
        if changes:
            resume_note += f"; applied from step {step}: {runs.describe(changes)}"
        if step >= total:
            resume_note += ("; finished already, nothing to train (a larger train.max_steps trains on, "
                            "ckpt.overwrite=true starts over)")
    # every setting changed on resume, with the step it took effect at, across all resumes of this run
    config_changes = (saved.get("config_changes", []) if saved is not None else []) + changes

    val_batches = None
    if cfg.train.val_every > 0:
        rng = checkpoint.rng_state(None)  # building the validation loader touches no training stream
        val_batches = load_val_batches(cfg, env.rank, env.world_size)
        checkpoint.set_rng_state(rng, None)
    num_views = cfg.model.num_views
    bounds = None  # constraint-loss reference values, from the first batch's series count
    monitor = Monitor(env.is_main, cfg.ckpt.dir, total, cfg.train.progress, cfg.log.tensorboard, start_step=step)
    monitor.print(f"simmtm: {n_params / 1e6:.1f}M parameters, "
                  f"{env.world_size} rank(s) [{env.launcher}] on {env.device}, "
                  f"engine={'deepspeed' if use_ds else 'torch'}, {total} steps ({steps_per_epoch}/epoch), "
                  f"batch {cfg.train.batch_size} x {cfg.train.grad_accum} accum"
                  + (f", validation every {cfg.train.val_every} steps on {len(val_batches)} batch(es)/rank of "
                     f"split {cfg.train.val_split!r}" if val_batches else "")
                  + run_note + resume_note)
    if env.is_main:
        Path(cfg.ckpt.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.ckpt.dir) / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        (Path(cfg.ckpt.dir) / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0) if use_ds else 0
    if cfg.ckpt.save_optimizer_every > 0 and zero_stage == 3:
        raise ConfigError("ckpt.save_optimizer_every: weights-only checkpoints need whole parameters on rank 0; "
                          "ZeRO-3 partitions them (use 0, or ZeRO stage <= 2)")

    def save(at_step: int, is_best: bool = False, final: bool = False) -> Path:
        k, every = cfg.ckpt.save_optimizer_every, cfg.ckpt.every
        full = final or k == 0 or (every > 0 and at_step % (every * k) == 0)
        shared = {"step": at_step, "epoch": epoch, "history": history, "config": to_dict(cfg),
                  "world_size": env.world_size, "engine": "deepspeed" if use_ds else "torch",
                  "zero_stage": zero_stage, "resumable": full, "config_changes": config_changes}
        if best is not None:
            shared["best"] = best
        if bounds is not None:
            shared["constraint_num_series"] = bounds["num_series"]
        if guard.skipped:
            shared["nonfinite_skipped"] = guard.skipped
        per_rank = {"rng": checkpoint.rng_state(generator), "data": loader.state_dict()}
        folder = checkpoint.save(engine, ckpt_dir, at_step, shared, per_rank, cfg.ckpt.keep, best=is_best,
                                 weights_only=not full)
        if cfg.ckpt.remote:
            checkpoint.upload(folder, cfg.ckpt.remote, cfg.ckpt.storage_options, env.local_rank, cfg.ckpt.keep,
                              best=best["tag"] if best else None)
        return folder

    meter = Throughput()
    engine.train()
    keys = ("loss", "loss_rec", "loss_cl")
    acc = None  # this step's losses on the device, summed over its micro-steps (fp64: as Python adds them)
    micro = 0
    last_saved = resume_dir / resume_tag if saved is not None else None
    guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_nonfinite_in_row, env.device)
    guard.skipped = saved.get("nonfinite_skipped", 0) if saved is not None else 0
    final_is_best = False
    wait_mark = loader.wait_seconds
    while step < total:
        loader.set_epoch(epoch)
        for x in to_device(loader, env.device):
            wait = loader.wait_seconds - wait_mark
            want_image = cfg.log.image_every > 0 and (step + 1) % cfg.log.image_every == 0 and env.is_main
            out = engine(x, gather=gather, generator=generator,
                         global_aggregation=cfg.dist.global_aggregation, details=want_image)
            lr = engine.get_lr()[0]  # the rate this step uses
            engine.backward(out["loss"])
            part = torch.stack([out[k].detach() for k in keys]).double() / cfg.train.grad_accum
            acc = part if acc is None else acc + part
            micro += 1
            meter.add(out["num_series"] * env.world_size, out["num_series"] * x.shape[-1] * env.world_size, wait)
            wait_mark = loader.wait_seconds
            if micro % cfg.train.grad_accum:
                step_unless_nonfinite(engine)  # inside the accumulation window: no update yet
                continue
            at, losses, acc = step + 1, acc, None
            guard.step(engine, at, losses)  # a non-finite update is never applied, on any rank
            # The host reads this step (one all-reduce, one sync) only to log it, and always before a
            # validation or a save, so the guard speaks first; under skip_step at every step.
            read = (guard.sync or at == 1 or at % cfg.train.log_every == 0 or at == total
                    or (val_batches is not None and at % cfg.train.val_every == 0)
                    or (cfg.ckpt.every > 0 and at % cfg.ckpt.every == 0))
            if read:
                gn = engine.get_global_grad_norm()
                on_device = [dist.all_reduce_mean(torch.cat([losses.float(), guard.flag()])),
                             out["sigma_rec"].reshape(1), out["sigma_cl"].reshape(1)]
                if isinstance(gn, torch.Tensor):
                    on_device.append(gn.float().reshape(1).to(env.device))
                host = torch.cat(on_device).tolist()
                means, flagged, sigma = dict(zip(keys, host[:3])), host[3] > 0, host[4:6]
                grad_norm = host[6] if isinstance(gn, torch.Tensor) else float("nan") if gn is None else float(gn)
                if guard.verdict(flagged, means, at,
                                 f"nothing from it was saved; the last good checkpoint is {last_saved}" if last_saved
                                 else "nothing from it was saved, and no checkpoint was saved before it"):
                    # skip_step: the batch is dropped, the step not counted, the schedule not moved
                    monitor.print(f"step {at}: non-finite update dropped ({guard.in_row} in a row, "
                                  f"{guard.skipped} in all)")
                    continue
            step += 1
            if bounds is None:
                global_rows = env.world_size if cfg.dist.global_constraint else 1
                bounds = constraint_bounds(num_views, out["num_series"] * (num_views + 1) * global_rows)
            improved, postfix = False, None
            if read:
                rates = meter.rates()
                record = {"step": step, **means, "lr": lr, "series_per_s": rates["series_per_s"],
                          "time_s": meter.elapsed}
                if val_batches and (step % cfg.train.val_every == 0 or step == total):
                    val = validate(engine, val_batches, gather, cfg, env.device, env.rank)
                    record.update(val)
                    if val["val_loss"] < (best["val_loss"] if best else float("inf")):
                        best, improved = {"tag": checkpoint.tag_for(step), "step": step,
                                          "val_loss": val["val_loss"]}, True
                    monitor.scalars(step, {"val/loss": val["val_loss"], "val/reconstruction": val["val_loss_rec"],
                                           "val/constraint": val["val_loss_cl"],
                                           "val/constraint_formed": constraint_formed(val["val_loss_cl"], bounds)})
                if step == 1 or step % cfg.train.log_every == 0 or step == total or "val_loss" in record:
                    history.append(record)
                    val_text = (f" | val {record['val_loss']:.4f} rec {record['val_loss_rec']:.4f} "
                                f"cl {record['val_loss_cl']:.4f}{' *best' if improved else ''}"
                                if "val_loss" in record else "")
                    monitor.print(f"step {step}/{total} loss {means['loss']:.4f} rec {means['loss_rec']:.4f} "
                                  f"cl {means['loss_cl']:.4f} lr {record['lr']:.2e} "
                                  f"{rates['series_per_s']:.1f} series/s" + val_text)
                    monitor.scalars(step, {"loss/total": means["loss"], "loss/reconstruction": means["loss_rec"],
                                           "loss/constraint": means["loss_cl"],
                                           "loss/constraint_formed": constraint_formed(means["loss_cl"], bounds),
                                           "weight/sigma_rec": sigma[0], "weight/sigma_cl": sigma[1],
                                           "lr": record["lr"], "grad_norm": grad_norm,
                                           "nonfinite/skipped": guard.skipped,
                                           "throughput/series_per_s": rates["series_per_s"],
                                           "throughput/points_per_s": rates["points_per_s"],
                                           "data/wait_fraction": rates["data_wait_fraction"],
                                           "memory/peak_gb": peak_memory_gb(env.device)})
                    postfix = {"loss": f"{means['loss']:.3f}", "rec": f"{means['loss_rec']:.3f}",
                               "series/s": f"{rates['series_per_s']:.0f}"}
            if want_image:
                monitor.reconstruction_image(step, x[0].float(), out["pred"][0], out["weights"])
            monitor.step(step, postfix)
            if step < total and (improved or (cfg.ckpt.every > 0 and step % cfg.ckpt.every == 0)):
                last_saved = save(step, is_best=improved)
            final_is_best = improved
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
        last_saved = save(step, is_best=final_is_best, final=True)
    digests = dist.all_gather_object(dist.parameter_digest(engine.module))
    data_stats = dist.sum_counters(loader.stats)
    rates = meter.rates()
    summary = {"steps": step, "epochs_started": epoch + 1, "first": history[0] if history else None,
               "last": history[-1] if history else None, "series_per_s": rates["series_per_s"],
               "points_per_s": rates["points_per_s"], "data_wait_fraction": rates["data_wait_fraction"],
               "peak_memory_gb": peak_memory_gb(env.device), "elapsed_s": meter.elapsed,
               "world_size": env.world_size, "checkpoint": str(last_saved), "data_stats": data_stats,
               "replicas_identical": len(set(digests)) == 1, "parameter_digests": digests,
               "nonfinite_skipped": guard.skipped, "config_changes": config_changes, "history": history}
    if bounds is None and saved is not None:  # nothing trained this time: the resumed run's series count
        n0 = saved.get("constraint_num_series")
        bounds = constraint_bounds(num_views, n0) if n0 else None
    if bounds is not None and history:
        cl = {"num_views": bounds["num_views"], "num_series": bounds["num_series"],
              "perfect": bounds["perfect"], "chance": bounds["chance"],
              "first": history[0]["loss_cl"], "first_formed": constraint_formed(history[0]["loss_cl"], bounds),
              "last": history[-1]["loss_cl"], "last_formed": constraint_formed(history[-1]["loss_cl"], bounds)}
        vals = [h for h in history if "val_loss_cl" in h]
        if vals:
            cl.update(val_last=vals[-1]["val_loss_cl"], val_last_formed=constraint_formed(vals[-1]["val_loss_cl"], bounds),
                      val_step=vals[-1]["step"])
        summary["constraint"] = cl
    vals = [h for h in history if "val_loss" in h]
    if vals:
        summary["validation"] = {"every": cfg.train.val_every, "batches_per_rank": len(val_batches or []),
                                 "split": cfg.train.val_split, "first": {k: vals[0][k] for k in ("step", "val_loss")},
                                 "last": {k: vals[-1][k] for k in ("step", "val_loss", "val_loss_rec", "val_loss_cl")}}
    summary["best"] = best
    if best is not None:
        summary["best_checkpoint"] = str(ckpt_dir / best["tag"])
    monitor.hparams(runs.flatten(to_dict(cfg)), {"final/loss_rec": summary["last"]["loss_rec"] if history else 0.0})
    monitor.close()
    dist.release_engine(engine)
    if env.is_main:
        if cfg.ckpt.publish:
            from trainer.publish import publish

            # ckpt.publish_from=best: the lowest-validation-loss checkpoint when the run has one, else the last
            source, chosen = last_saved, "last"
            if cfg.ckpt.publish_from == "best" and best is not None and \
                    (ckpt_dir / best["tag"] / checkpoint.COMPLETE).exists():
                source, chosen = ckpt_dir / best["tag"], "best"
            m = publish(source, cfg.ckpt.publish, include_heads=cfg.ckpt.publish_heads,
                        storage_options=cfg.ckpt.storage_options or cfg.data.storage_options, selected=chosen)
            summary["published"] = cfg.ckpt.publish
            summary["published_from"] = {"selected": chosen, "checkpoint": str(source), "step": m["steps"],
                                         "val_loss": m.get("val_loss")}
        (Path(cfg.ckpt.dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def _change(first: float, last: float) -> str:
    """'(12.3% lower)' / '(4.5% higher)' relative to `first`."""
    if not first or first != first or last != last:
        return "(n/a)"
    pct = 100.0 * (last - first) / abs(first)
    return f"({abs(pct):.1f}% {'higher' if pct > 0 else 'lower'})"


def print_summary(s: dict) -> None:
    nan = float("nan")
    first, last = s["first"] or {}, s["last"] or {}
    cl = s.get("constraint")
    cl_text = f"{first.get('loss_cl', nan):.4f} -> {last.get('loss_cl', nan):.4f}"
    if cl:
        cl_text += (f" (perfect grouping {cl['perfect']:.2f}, chance {cl['chance']:.2f} for M={cl['num_views']}, "
                    f"N={cl['num_series']}: {100 * cl['first_formed']:.0f}% -> {100 * cl['last_formed']:.0f}% "
                    f"of the way)")
    rows = [("steps", f"{s['steps']}"),
            ("reconstruction loss", f"{first.get('loss_rec', nan):.4f} -> {last.get('loss_rec', nan):.4f}"
             f" {_change(first.get('loss_rec', nan), last.get('loss_rec', nan))}"),
            ("constraint loss", cl_text),
            ("total loss", f"{first.get('loss', nan):.4f} -> {last.get('loss', nan):.4f}")]
    v = s.get("validation")
    if v:
        text = (f"{v['first']['val_loss']:.4f} (step {v['first']['step']}) -> {v['last']['val_loss']:.4f} "
                f"(step {v['last']['step']}): rec {v['last']['val_loss_rec']:.4f}, cl {v['last']['val_loss_cl']:.4f}")
        if cl and "val_last_formed" in cl:
            text += f" ({100 * cl['val_last_formed']:.0f}% of the way)"
        rows.append(("validation loss", text))
    if s.get("nonfinite_skipped"):
        rows.append(("non-finite updates", f"{s['nonfinite_skipped']} dropped (train.on_nonfinite=skip_step)"))
    if s.get("config_changes"):
        rows.append(("changed on resume", "; ".join(f"{c['key']} {c['from']!r} -> {c['to']!r} at step {c['step']}"
                                                    for c in s["config_changes"])))
    if s.get("best"):
        rows.append(("best checkpoint", f"{s['best']['tag']} (step {s['best']['step']}, "
                                        f"val loss {s['best']['val_loss']:.4f})"))
    rows += [("throughput", f"{s['series_per_s']:.1f} series/s, {s['points_per_s']:.0f} points/s"),
             ("data wait", f"{100 * s['data_wait_fraction']:.2f}% of wall time"),
             ("peak memory", f"{s['peak_memory_gb']:.2f} GB"),
             ("wall time", f"{s['elapsed_s']:.1f} s on {s['world_size']} rank(s)"),
             ("data", json.dumps(s["data_stats"])),
             ("replicas identical", f"{s['replicas_identical']} ({s['world_size']} rank(s))"),
             ("checkpoint", s["checkpoint"])]
    if s.get("published"):
        pf = s.get("published_from") or {}
        rows.append(("published", f"{s['published']} ({pf.get('selected', 'last')} checkpoint, step {pf.get('step')}"
                                  + (f", val loss {pf['val_loss']:.4f}" if pf.get("val_loss") is not None else "")
                                  + ")"))
    width = max(len(r[0]) for r in rows)
    print("\n== SimMTM pre-training summary ==")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> Optional[dict]:
    from trainer.cli import show_help

    argv = sys.argv[1:] if argv is None else argv
    if show_help(argv, __doc__, Config):
        return None
    path, overrides = split_cli(argv)
    cfg = load_config(path, overrides)
    try:
        return train(cfg)
    finally:
        dist.teardown()


if __name__ == "__main__":
    from trainer import cli

    dist.exit_process(cli.run(main))
