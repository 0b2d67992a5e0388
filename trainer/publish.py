"""Publish a pre-training checkpoint as a foundation model folder others can fine-tune.

    python trainer/publish.py CHECKPOINT OUT [--last] [--no-heads] [--storage-options JSON]

CHECKPOINT is a checkpoint folder (`runs/x/checkpoints/step_00000040`) or a run directory: its best
checkpoint (lowest validation loss, the `best` pointer) when the run validated (train.val_every > 0),
otherwise, or with --last, its latest checkpoint. ZeRO shards are consolidated into one fp32 model. OUT (a local path or any
fsspec URL, e.g. s3://bucket/models/simmtm-etth1 or hf://owner/name on the Hugging Face Hub) receives:
    model.safetensors   encoder weights (+ projector/decoder unless --no-heads), fp32
    config.json         architecture, pre-training settings, data manifest hash, code version
    README.md           model card
    metrics.json        steps, losses, throughput; which checkpoint (best/last), its step and val loss
Load it with `models.Encoder.from_pretrained(OUT)` (or `models.load_pretrained(OUT)`): no DeepSpeed, no pickle.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from models import SimMTM, SimMTMConfig
from models.hub import first_nonfinite, join, save_pretrained, write_bytes
from trainer import checkpoint
from trainer.config import REPO_ROOT


def resolve(path: str | Path, prefer_best: bool = False) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a checkpoint folder or a run directory (its `best` checkpoint when
    `prefer_best` and the run has one, else its latest)."""
    p = Path(path)
    if (p / checkpoint.COMPLETE).exists():
        return p.parent, p.name
    for d in (p, p / "checkpoints"):
        tag = checkpoint.best_tag(d) if prefer_best and (d / checkpoint.BEST).exists() else None
        tag = tag or (checkpoint.latest_tag(d) if (d / checkpoint.LATEST).exists() else None)
        if tag:
            return d, tag
    raise checkpoint.CheckpointError(f"{p}: neither a complete checkpoint folder nor a run with checkpoints")


def consolidated_state(ckpt_dir: Path, tag: str, state: dict) -> dict:
    """One fp32 state dict, whatever the engine and ZeRO stage that wrote the checkpoint."""
    folder = ckpt_dir / tag
    checkpoint.verify(folder)
    if state["engine"] != "deepspeed" or not state.get("resumable", True):  # ours: model.safetensors
        try:
            return load_file(str(folder / "model.safetensors"))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise checkpoint.CheckpointError(f"{folder / 'model.safetensors'}: unreadable ({e})") from None
    with checkpoint.safe_torch_load():
        if state.get("zero_stage", 0) > 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        else:
            sd = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def model_card(cfg: dict, metrics: dict, include_heads: bool) -> str:
    m, d = cfg["model"], cfg["data"]
    first, last = metrics.get("first") or {}, metrics.get("last") or {}
    val = metrics.get("val_loss")
    chosen = (f"the best checkpoint by validation loss (split `{cfg['train'].get('val_split', 'val')}`): step "
              f"{metrics['steps']}, val loss {val:.4f}" if metrics.get("selected") == "best" and val is not None
              else f"the {metrics.get('selected') or 'given'} checkpoint: step {metrics['steps']}"
              + (f", val loss {val:.4f}" if val is not None else ""))
    return f"""# SimMTM foundation model: {cfg.get('name', 'simmtm')}

A time-series encoder pre-trained with SimMTM (Dong et al., NeurIPS 2023): masked time-series
modelling by reconstructing each series from a similarity-weighted aggregation of several masked
views, with a manifold constraint on the series-wise representations.

## Data
- source: `{d['source']}` (split `{d['split']}`, window {m['seq_len']}, stride {d['window_stride']},
  channels {d['channels']}, {'each series z-scored by its own statistics' if d.get('series_norm') else
  'z-scored with train-split statistics' if d['normalize'] else 'not normalised'})
- data manifest content hash: `{metrics.get('data_manifest_hash')}`

## Architecture
- {m['encoder']} Transformer encoder, channel-independent: d_model {m['d_model']}, {m['n_heads']} heads,
  {m['e_layers']} layers, d_ff {m['d_ff']}{', patches ' + str(m['patch_len']) + '/' + str(m['patch_stride']) if m['encoder'] == 'patch' else ''}
- input length {m['seq_len']}; instance normalisation per series
- pre-training heads (projector -> {m['proj_dim']}, linear decoder) included: {include_heads}

## Pre-training
- {metrics['steps']} optimizer steps on {metrics.get('world_size', 1)} rank(s); masking {m['mask']} r={m['mask_ratio']},
  lm={m['mask_lm']}, M={m['num_views']} views, tau={m['temperature']}; lr {cfg['optim']['lr']}, batch {cfg['train']['batch_size']}
  per rank
- reconstruction loss {first.get('loss_rec', float('nan')):.4f} -> {last.get('loss_rec', float('nan')):.4f};
  constraint loss {first.get('loss_cl', float('nan')):.4f} -> {last.get('loss_cl', float('nan')):.4f}
- published: {chosen}
- code version `{metrics.get('code_version')}`

## Intended use
Initialisation for forecasting and classification fine-tuning on z-scored series of any channel
count (channels are encoded independently). Not a forecaster by itself.

## How to fine-tune
```python
from models import load_pretrained
from models.heads import Forecaster, Classifier
encoder = load_pretrained("THIS_FOLDER_OR_URL")          # no DeepSpeed, no pickle
model = Forecaster(encoder, horizon=96, dropout=0.1)      # or Classifier(encoder, num_classes)
```
or `python trainer/finetune.py --config configs/finetune_etth1.yaml init=THIS_FOLDER_OR_URL task.horizon=96`
(`configs/finetune_gesture.yaml` for classification; `task.mode=linear_probe` keeps the encoder frozen).
"""


def publish(ckpt: str | Path, out: str, include_heads: bool = True, storage_options: Optional[dict] = None,
            prefer: str = "best", selected: Optional[str] = None) -> dict:
    """`prefer`: for a run directory, "best" (its best checkpoint when it has one, else the latest)
    or "last". `selected` labels the choice in metrics/model card (default: inferred)."""
    if prefer not in ("best", "last"):
        raise ValueError(f"prefer must be 'best' or 'last', got {prefer!r}")
    ckpt_dir, tag = resolve(ckpt, prefer_best=prefer == "best")
    state = checkpoint.read_state(ckpt_dir, tag)
    best = state.get("best")
    if selected is None:
        selected = "best" if best and best.get("tag") == tag else "last"
    cfg = state["config"]
    model = SimMTM(SimMTMConfig(**cfg["model"]))
    sd = consolidated_state(ckpt_dir, tag, state)
    bad = first_nonfinite(sd)
    if bad is not None:
        raise checkpoint.CheckpointError(f"{ckpt_dir / tag}: tensor {bad} holds NaN or inf (a diverged run); "
                                         f"refusing to publish it (publish an earlier checkpoint folder)")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"{ckpt_dir / tag}: weights do not match the saved config: {e}") from None
    rank0 = checkpoint.load_rank_state(ckpt_dir, tag, 0)
    history = state.get("history", [])
    at_step = [h for h in history if h.get("step") == state["step"] and "val_loss" in h]
    val_loss = at_step[-1]["val_loss"] if at_step else (best["val_loss"] if best and best.get("tag") == tag else None)
    metrics = {"steps": state["step"], "epoch": state["epoch"], "world_size": state["world_size"],
               "selected": selected, "val_loss": val_loss, "best": best,
               "first": history[0] if history else None, "last": history[-1] if history else None,
               "data_manifest_hash": rank0.get("data", {}).get("layout", {}).get("content_hash"),
               "code_version": code_version(), "checkpoint": str(ckpt_dir / tag),
               "published": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    extra = {"pretraining": {k: cfg[k] for k in ("data", "optim", "train", "dist") if k in cfg},
             "name": cfg.get("name"), "steps": state["step"], "data_manifest_hash": metrics["data_manifest_hash"],
             "code_version": metrics["code_version"], "format_version": 1}
    save_pretrained(model, out, extra=extra, include_heads=include_heads, storage_options=storage_options)
    write_bytes(join(out, "README.md"), model_card(cfg, metrics, include_heads).encode(), storage_options)
    write_bytes(join(out, "metrics.json"), json.dumps(metrics, indent=2).encode(), storage_options)
    return metrics


def main(argv: Optional[list[str]] = None) -> None:
    from trainer.cli import DEBUG_EPILOG

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DEBUG_EPILOG)
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--no-heads", action="store_true", help="publish the encoder only")
    ap.add_argument("--last", action="store_true",
                    help="publish a run directory's latest checkpoint even when it has a best one")
    ap.add_argument("--storage-options", default="{}", help="JSON passed to fsspec for OUT (e.g. endpoint_url)")
    a = ap.parse_args(argv)
    try:
        storage_options = json.loads(a.storage_options)
    except json.JSONDecodeError as e:
        ap.error(f"--storage-options: not valid JSON ({e})")
    m = publish(a.checkpoint, a.out, include_heads=not a.no_heads, storage_options=storage_options,
                prefer="last" if a.last else "best")
    val = f", val loss {m['val_loss']:.4f}" if m.get("val_loss") is not None else ""
    print(f"published {m['checkpoint']} ({m['selected']}: step {m['steps']}{val}) -> {a.out}")


if __name__ == "__main__":
    from trainer import cli
    from trainer import distributed as dist

    dist.exit_process(cli.run(main))
