"""SimMTM pre-training. The same file runs under `python`, `torchrun`, `deepspeed` and `srun`:

    python trainer/pretrain.py [--config configs/etth1.yaml] [key=value ...]   # or python -m trainer.pretrain
    deepspeed --num_gpus 2 trainer/pretrain.py --config configs/etth1.yaml

`train` below is the whole run: build (Pretraining: folder, process group, data, model, engine, and
the resume of every registered piece of run state), a step loop over an endless loader, the final
checkpoint and the summary.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import torch

from data_pipeline import build_loader, to_device
from data_pipeline.fs import atomic_write
from models import Gather, SimMTM
from trainer import checkpoint, runs
from trainer import distributed as dist
from trainer.config import Config, ConfigError, load_config, repo_path, split_cli, to_dict
from trainer.engine import NonFiniteGuard, build_engine, compile_model, epoch_cosine, step_unless_nonfinite
from trainer.monitor import Monitor, Throughput, peak_memory_gb
from trainer.state import RNGState, TrainState, rng_state, seed_everything, set_rng_state

KEYS = ("loss", "loss_rec", "loss_cl")


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
    rng = rng_state(None)
    module = engine if isinstance(engine, torch.nn.Module) else engine.module  # DeepSpeed's engine or plain
    was_training = module.training
    module.eval()
    generator = torch.Generator(device=device).manual_seed(val_seed(cfg, rank))
    sums = None  # on the device, fp64 (as Python adds them): read once, at the end
    try:
        with torch.no_grad():
            for batch in batches:
                out = engine(batch.to(device), gather=gather, generator=generator,
                             global_aggregation=cfg.dist.global_aggregation)
                part = torch.stack([out[k].detach() for k in KEYS]).double()
                sums = part if sums is None else sums + part
    finally:
        module.train(was_training)
        set_rng_state(rng, None)
    means = dist.all_reduce_mean(sums / len(batches)).tolist()
    return {f"val_{k}": v for k, v in zip(KEYS, means)}


def train(cfg: Config) -> dict:
    """Run pre-training as configured; returns the summary (on every rank)."""
    run = Pretraining(cfg)  # the run folder, process group, data, model and engine, resumed if asked
    batches = run.batches()
    while run.state.step < run.total:
        out = run.train_step(batches)  # one optimizer update over train.grad_accum micro-batches
        if out is None:  # a non-finite update dropped (train.on_nonfinite=skip_step): not a step
            continue
        run.state.step += 1
        improved = run.report(out)  # log, validate, track the best checkpoint
        if run.state.step < run.total and (improved or run.checkpoint_due()):
            run.save(is_best=improved)
        run.final_is_best = improved
    batches.close()
    return run.finish()  # the final checkpoint, the summary, publishing


class Pretraining:
    """The pieces of one pre-training run and the steps `train` runs them through."""

    def __init__(self, cfg: Config):
        if cfg.train.val_every > 0 and (cfg.train.val_split == "test" or cfg.train.val_split == cfg.data.split):
            raise ConfigError(f"train.val_split={cfg.train.val_split!r}: the best checkpoint must be chosen on held-back "
                              f"data, not on the {'test' if cfg.train.val_split == 'test' else 'training'} split")
        cfg.data.source, cfg.data.cache_dir = repo_path(cfg.data.source), repo_path(cfg.data.cache_dir, anchor=True)
        self.cfg, self.ckpt_dir = cfg, Path(cfg.ckpt.dir) / "checkpoints"
        # before any process group exists: the checkpoint to continue and the settings it cannot honour
        self.point = point = runs.resume_point(cfg)
        engine_was = point.state["engine"] if point else None
        cfg.dist.deepspeed = cfg.dist.deepspeed or dist.discover().world_size > 1 or engine_was == "deepspeed"
        changes = runs.config_changes(point.state["config"], to_dict(cfg), point.state["step"]) if point else []
        self.env = env = dist.start(cfg.dist, cfg.train.num_threads)
        note = runs.prepare(cfg, point, env.is_main)
        seed_everything(cfg.train.seed + env.rank)

        self.loader = build_loader(cfg.data, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size,
                                   rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
                                   pin_memory=env.device.type == "cuda")
        self.steps_per_epoch = max(1, len(self.loader) // cfg.train.grad_accum)
        self.total = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * self.steps_per_epoch
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = SimMTM(cfg.model)
        torch.manual_seed(cfg.train.seed + env.rank)  # then per-rank streams (dropout)
        self.n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self.engine, self.ds_config = build_engine(
            model, cfg, env.device, self.total, load_universal=point is not None and point.universal(env.world_size),
            lr_lambda=epoch_cosine_lambda(cfg, self.steps_per_epoch, self.total))
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0) if cfg.dist.deepspeed else 0
        if cfg.ckpt.save_optimizer_every > 0 and self.zero_stage == 3:
            raise ConfigError("ckpt.save_optimizer_every: weights-only checkpoints need whole parameters on rank 0; "
                              "ZeRO-3 partitions them (use 0, or ZeRO stage <= 2)")
        if cfg.train.compile:
            compile_model(self.engine)
        self.rng = RNGState(env.device, cfg.train.seed, env.rank)
        reduce = dist.all_reduce_with_grad if env.distributed else None  # projector BN over the global batch
        self.gather = Gather(dist.all_gather_with_grad, env.rank, env.world_size, reduce) \
            if cfg.dist.global_constraint else Gather(reduce=reduce)
        self.state = TrainState()
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_nonfinite_in_row, env.device)
        # the run state checkpoints carry (shared ones in state.json, the others per rank)
        self.states = {"train": self.state, "nonfinite": self.guard, "rng": self.rng, "data": self.loader}
        self.last_saved = None
        if point is not None:
            note += self.resume(changes)
        self.state.config_changes = self.state.config_changes + changes
        self.val_batches = None
        if cfg.train.val_every > 0:
            rng = rng_state(None)  # building the validation loader touches no training stream
            self.val_batches = load_val_batches(cfg, env.rank, env.world_size)
            set_rng_state(rng, None)
        self.bounds = None  # constraint-loss reference values, from this process's first step
        self.final_is_best = False
        self.monitor = Monitor(env.is_main, cfg.ckpt.dir, self.total, cfg.train.progress, cfg.log.tensorboard,
                               start_step=self.state.step)
        self.monitor.print(
            f"simmtm: {self.n_params / 1e6:.1f}M parameters, {env.world_size} rank(s) [{env.launcher}] on {env.device}, "
            f"engine={'deepspeed' if cfg.dist.deepspeed else 'torch'}, {self.total} steps ({self.steps_per_epoch}/epoch), "
            f"batch {cfg.train.batch_size} x {cfg.train.grad_accum} accum"
            + (f", validation every {cfg.train.val_every} steps on {len(self.val_batches)} batch(es)/rank of "
               f"split {cfg.train.val_split!r}" if self.val_batches else "") + note)
        if env.is_main:
            atomic_write(f"{cfg.ckpt.dir}/config.json", json.dumps(to_dict(cfg), indent=2).encode())
            atomic_write(f"{cfg.ckpt.dir}/ds_config.json", json.dumps(self.ds_config, indent=2).encode())
        self.meter = Throughput()
        self.engine.train()
        self.wait_mark = self.loader.wait_seconds

    def resume(self, changes: list) -> str:
        """Load the resume point into the engine and every registered state; returns the log's note."""
        point, step_was = self.point, self.point.state["step"]
        checkpoint.resume(self.engine, self.states, point, self.env.world_size)
        self.last_saved = point.dir / point.tag
        self.state.best = runs.restore_best(self.ckpt_dir, point, self.env.is_main)
        note = (f", resumed from {point.tag} at step {step_was}" if not point.resized(self.env.world_size) else
                f", resumed from {point.tag} (saved with {point.state['world_size']} ranks) at step {step_was}: "
                f"epoch {self.state.epoch} restarts with this world size's data order")
        if self.state.best is not None:
            note += f" (best so far: {self.state.best['tag']}, val loss {self.state.best['val_loss']:.4f})"
        if changes:
            note += f"; applied from step {step_was}: {runs.describe(changes)}"
        if step_was >= self.total:
            note += "; finished already, nothing to train (a larger train.max_steps trains on, ckpt.overwrite=true starts over)"
        return note

    def batches(self) -> Iterator[torch.Tensor]:
        """The loader's batches on the device, epoch after epoch (counted in the train state)."""
        while True:
            self.loader.set_epoch(self.state.epoch)
            yield from to_device(self.loader, self.env.device)
            self.state.epoch += 1

    def train_step(self, batches: Iterator[torch.Tensor]) -> Optional[dict]:
        """Forward and backward over train.grad_accum micro-batches, then the update (never applied when
        non-finite). Returns the step's outputs, with the losses read on the host at log, validation
        and checkpoint steps; None when train.on_nonfinite=skip_step dropped the update."""
        cfg, env, engine, at = self.cfg, self.env, self.engine, self.state.step + 1
        want_image = cfg.log.image_every > 0 and at % cfg.log.image_every == 0 and env.is_main
        losses = None  # this step's losses on the device, summed over its micro-steps (fp64: as Python adds them)
        for micro in range(cfg.train.grad_accum):
            x = next(batches)
            wait = self.loader.wait_seconds - self.wait_mark
            out = engine(x, gather=self.gather, generator=self.rng.generator,
                         global_aggregation=cfg.dist.global_aggregation, details=want_image)
            lr = engine.get_lr()[0]  # the rate this step uses
            engine.backward(out["loss"])
            part = torch.stack([out[k].detach() for k in KEYS]).double() / cfg.train.grad_accum
            losses = part if losses is None else losses + part
            self.meter.add(out["num_series"] * env.world_size, out["num_series"] * x.shape[-1] * env.world_size, wait)
            self.wait_mark = self.loader.wait_seconds
            if micro < cfg.train.grad_accum - 1:
                step_unless_nonfinite(engine)  # inside the accumulation window: no update yet
        self.guard.step(engine, at, losses)  # a non-finite update is never applied, on any rank
        result = {"x": x, "out": out, "lr": lr, "want_image": want_image, "means": None}
        # The host reads this step (one all-reduce, one sync) only to log it, and always before a
        # validation or a save, so the guard speaks first; under skip_step at every step.
        if not (self.guard.sync or at == 1 or at % cfg.train.log_every == 0 or at == self.total
                or self.validation_due(at) or self.checkpoint_due(at)):
            return result
        gn = engine.get_global_grad_norm()
        on_device = [dist.all_reduce_mean(torch.cat([losses.float(), self.guard.flag()])),
                     out["sigma_rec"].reshape(1), out["sigma_cl"].reshape(1)]
        if isinstance(gn, torch.Tensor):
            on_device.append(gn.float().reshape(1).to(env.device))
        host = torch.cat(on_device).tolist()
        result.update(means=dict(zip(KEYS, host[:3])), sigma=host[4:6],
                      grad_norm=host[6] if isinstance(gn, torch.Tensor) else float("nan") if gn is None else float(gn))
        saved = (f"nothing from it was saved; the last good checkpoint is {self.last_saved}" if self.last_saved
                 else "nothing from it was saved, and no checkpoint was saved before it")
        if self.guard.verdict(host[3] > 0, result["means"], at, saved):
            # skip_step: the batch is dropped, the step not counted, the schedule not moved
            self.monitor.print(f"step {at}: non-finite update dropped ({self.guard.in_row} in a row, "
                               f"{self.guard.skipped} in all)")
            return None
        return result

    def validation_due(self, step: int) -> bool:
        return self.val_batches is not None and step % self.cfg.train.val_every == 0

    def checkpoint_due(self, step: Optional[int] = None) -> bool:
        every = self.cfg.ckpt.every
        return every > 0 and (self.state.step if step is None else step) % every == 0

    def report(self, r: dict) -> bool:
        """Log the step just taken (history, console, TensorBoard) and validate when due; True when the
        validation loss is the best so far."""
        cfg, state, step, env = self.cfg, self.state, self.state.step, self.env
        if self.bounds is None:
            global_rows = env.world_size if cfg.dist.global_constraint else 1
            self.bounds = constraint_bounds(cfg.model.num_views,
                                            r["out"]["num_series"] * (cfg.model.num_views + 1) * global_rows)
            state.constraint_num_series = self.bounds["num_series"]
        improved, postfix, means = False, None, r["means"]
        if means is not None:
            rates = self.meter.rates()
            record = {"step": step, **means, "lr": r["lr"], "series_per_s": rates["series_per_s"],
                      "time_s": self.meter.elapsed}
            if self.val_batches and (step % cfg.train.val_every == 0 or step == self.total):
                val = validate(self.engine, self.val_batches, self.gather, cfg, env.device, env.rank)
                record.update(val)
                if val["val_loss"] < (state.best["val_loss"] if state.best else float("inf")):
                    state.best, improved = {"tag": checkpoint.tag_for(step), "step": step,
                                            "val_loss": val["val_loss"]}, True
                self.monitor.scalars(step, {"val/loss": val["val_loss"], "val/reconstruction": val["val_loss_rec"],
                                            "val/constraint": val["val_loss_cl"],
                                            "val/constraint_formed": constraint_formed(val["val_loss_cl"], self.bounds)})
            if step == 1 or step % cfg.train.log_every == 0 or step == self.total or "val_loss" in record:
                state.history.append(record)
                val_text = (f" | val {record['val_loss']:.4f} rec {record['val_loss_rec']:.4f} "
                            f"cl {record['val_loss_cl']:.4f}{' *best' if improved else ''}"
                            if "val_loss" in record else "")
                self.monitor.print(f"step {step}/{self.total} loss {means['loss']:.4f} rec {means['loss_rec']:.4f} "
                                   f"cl {means['loss_cl']:.4f} lr {record['lr']:.2e} "
                                   f"{rates['series_per_s']:.1f} series/s" + val_text)
                self.monitor.scalars(step, {
                    "loss/total": means["loss"], "loss/reconstruction": means["loss_rec"],
                    "loss/constraint": means["loss_cl"],
                    "loss/constraint_formed": constraint_formed(means["loss_cl"], self.bounds),
                    "weight/sigma_rec": r["sigma"][0], "weight/sigma_cl": r["sigma"][1], "lr": record["lr"],
                    "grad_norm": r["grad_norm"], "nonfinite/skipped": self.guard.skipped,
                    "throughput/series_per_s": rates["series_per_s"], "throughput/points_per_s": rates["points_per_s"],
                    "data/wait_fraction": rates["data_wait_fraction"], "memory/peak_gb": peak_memory_gb(env.device)})
                postfix = {"loss": f"{means['loss']:.3f}", "rec": f"{means['loss_rec']:.3f}",
                           "series/s": f"{rates['series_per_s']:.0f}"}
        if r["want_image"]:
            self.monitor.reconstruction_image(step, r["x"][0].float(), r["out"]["pred"][0], r["out"]["weights"])
        self.monitor.step(step, postfix)
        return improved

    def save(self, is_best: bool = False, final: bool = False) -> None:
        cfg, step = self.cfg, self.state.step
        k, every = cfg.ckpt.save_optimizer_every, cfg.ckpt.every
        full = final or k == 0 or (every > 0 and step % (every * k) == 0)
        meta = {"config": to_dict(cfg), "world_size": self.env.world_size,
                "engine": "deepspeed" if cfg.dist.deepspeed else "torch", "zero_stage": self.zero_stage}
        folder = checkpoint.save(self.engine, self.ckpt_dir, step, self.states, meta, keep=cfg.ckpt.keep,
                                 best=is_best, weights_only=not full)
        if cfg.ckpt.remote:
            checkpoint.upload(folder, cfg.ckpt.remote, cfg.ckpt.storage_options, self.env.local_rank, cfg.ckpt.keep,
                              best=self.state.best["tag"] if self.state.best else None)
        self.last_saved = folder

    def finish(self) -> dict:
        """The final checkpoint (unless it is exactly the one this run resumed from: a finished run
        started again, whose `latest` must not be put at risk for nothing), the summary, publishing."""
        self.loader.close()  # join its threads now rather than when the collector or the exit hook gets to them
        cfg, env, state = self.cfg, self.env, self.state
        if self.point is None or state.step != self.point.state["step"]:
            self.save(is_best=self.final_is_best, final=True)
        digests = dist.all_gather_object(dist.parameter_digest(self.engine.module))
        data_stats = dist.sum_counters(self.loader.stats)
        summary = self.summary(digests, data_stats)
        self.monitor.hparams(runs.flatten(to_dict(cfg)),
                             {"final/loss_rec": summary["last"]["loss_rec"] if state.history else 0.0})
        self.monitor.close()
        self.engine.destroy()
        if env.is_main:
            if cfg.ckpt.publish:
                summary.update(self.publish())
            atomic_write(f"{cfg.ckpt.dir}/summary.json", json.dumps(summary, indent=2).encode())
            print_summary(summary)
        return summary

    def summary(self, digests: list, data_stats: dict) -> dict:
        cfg, env, state, history, bounds = self.cfg, self.env, self.state, self.state.history, self.bounds
        rates = self.meter.rates()
        summary = {"steps": state.step, "epochs_started": state.epoch + 1, "first": history[0] if history else None,
                   "last": history[-1] if history else None, "series_per_s": rates["series_per_s"],
                   "points_per_s": rates["points_per_s"], "data_wait_fraction": rates["data_wait_fraction"],
                   "peak_memory_gb": peak_memory_gb(env.device), "elapsed_s": self.meter.elapsed,
                   "world_size": env.world_size, "checkpoint": str(self.last_saved), "data_stats": data_stats,
                   "replicas_identical": len(set(digests)) == 1, "parameter_digests": digests,
                   "nonfinite_skipped": self.guard.skipped, "config_changes": state.config_changes, "history": history}
        if bounds is None and state.constraint_num_series:  # nothing trained this time: the resumed run's count
            bounds = constraint_bounds(cfg.model.num_views, state.constraint_num_series)
        if bounds is not None and history:
            cl = {k: bounds[k] for k in ("num_views", "num_series", "perfect", "chance")}
            cl.update(first=history[0]["loss_cl"], first_formed=constraint_formed(history[0]["loss_cl"], bounds),
                      last=history[-1]["loss_cl"], last_formed=constraint_formed(history[-1]["loss_cl"], bounds))
            vals = [h for h in history if "val_loss_cl" in h]
            if vals:
                cl.update(val_last=vals[-1]["val_loss_cl"],
                          val_last_formed=constraint_formed(vals[-1]["val_loss_cl"], bounds), val_step=vals[-1]["step"])
            summary["constraint"] = cl
        vals = [h for h in history if "val_loss" in h]
        if vals:
            summary["validation"] = {"every": cfg.train.val_every, "batches_per_rank": len(self.val_batches or []),
                                     "split": cfg.train.val_split, "first": {k: vals[0][k] for k in ("step", "val_loss")},
                                     "last": {k: vals[-1][k] for k in ("step", "val_loss", "val_loss_rec", "val_loss_cl")}}
        summary["best"] = state.best
        if state.best is not None:
            summary["best_checkpoint"] = str(self.ckpt_dir / state.best["tag"])
        return summary

    def publish(self) -> dict:
        """ckpt.publish_from=best: the lowest-validation-loss checkpoint when the run has one, else the last."""
        from trainer.publish import publish

        cfg, best = self.cfg, self.state.best
        source, chosen = self.last_saved, "last"
        if cfg.ckpt.publish_from == "best" and best is not None and \
                (self.ckpt_dir / best["tag"] / checkpoint.COMPLETE).exists():
            source, chosen = self.ckpt_dir / best["tag"], "best"
        m = publish(source, cfg.ckpt.publish, include_heads=cfg.ckpt.publish_heads,
                    storage_options=cfg.ckpt.storage_options or cfg.data.storage_options, selected=chosen)
        return {"published": cfg.ckpt.publish, "published_from": {"selected": chosen, "checkpoint": str(source),
                                                                  "step": m["steps"], "val_loss": m.get("val_loss")}}


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
    return train(cfg)


if __name__ == "__main__":
    from trainer import cli

    dist.exit_process(cli.run(main))
