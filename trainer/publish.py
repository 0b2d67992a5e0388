"""Publish a pre-training checkpoint as a foundation model folder others can fine-tune.

    python trainer/publish.py CHECKPOINT OUT [--no-heads] [--storage-options JSON]

CHECKPOINT is a checkpoint folder (`runs/x/checkpoints/step_00000040`) or a run directory (its
latest checkpoint). ZeRO shards are consolidated into one fp32 model. OUT (a local path or any
fsspec URL, e.g. s3://bucket/models/simmtm-etth1) receives:
    model.safetensors   encoder weights (+ projector/decoder unless --no-heads), fp32
    config.json         architecture, pre-training settings, data manifest hash, code version
    README.md           model card
    metrics.json        steps, losses, throughput
Load it with `models.load_pretrained(OUT)`: torch + safetensors only.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import load_file

from models import SimMTM, SimMTMConfig
from models.hub import join, save_pretrained, write_bytes
from trainer import checkpoint
from trainer.config import REPO_ROOT


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a checkpoint folder or a run directory."""
    p = Path(path)
    if (p / checkpoint.COMPLETE).exists():
        return p.parent, p.name
    for d in (p, p / "checkpoints"):
        tag = checkpoint.latest_tag(d) if (d / checkpoint.LATEST).exists() else None
        if tag:
            return d, tag
    raise checkpoint.CheckpointError(f"{p}: neither a complete checkpoint folder nor a run with checkpoints")


def consolidated_state(ckpt_dir: Path, tag: str, state: dict) -> dict:
    """One fp32 state dict, whatever the engine and ZeRO stage that wrote the checkpoint."""
    folder = ckpt_dir / tag
    checkpoint.verify(folder)
    if state["engine"] != "deepspeed":
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
    return f"""# SimMTM foundation model: {cfg.get('name', 'simmtm')}

A time-series encoder pre-trained with SimMTM (Dong et al., NeurIPS 2023): masked time-series
modelling by reconstructing each series from a similarity-weighted aggregation of several masked
views, with a manifold constraint on the series-wise representations.

## Data
- source: `{d['source']}` (split `{d['split']}`, window {m['seq_len']}, stride {d['window_stride']},
  channels {d['channels']}, z-scored with train-split statistics: {d['normalize']})
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
- code version `{metrics.get('code_version')}`

## Intended use
Initialisation for forecasting and classification fine-tuning on z-scored series of any channel
count (channels are encoded independently). Not a forecaster by itself.

## How to fine-tune
```python
from models import load_pretrained
from models.heads import Forecaster, Classifier
encoder = load_pretrained("THIS_FOLDER_OR_URL")          # torch + safetensors only
model = Forecaster(encoder, horizon=96, dropout=0.2)      # or Classifier(encoder, num_classes)
```
or `python trainer/finetune.py --config configs/finetune_etth1.yaml init=THIS_FOLDER_OR_URL task.horizon=96`
(`configs/finetune_gesture.yaml` for classification; `task.mode=linear_probe` keeps the encoder frozen).
"""


def publish(ckpt: str | Path, out: str, include_heads: bool = True, storage_options: Optional[dict] = None) -> dict:
    ckpt_dir, tag = resolve(ckpt)
    state = checkpoint.read_state(ckpt_dir, tag)
    cfg = state["config"]
    model = SimMTM(SimMTMConfig(**cfg["model"]))
    sd = consolidated_state(ckpt_dir, tag, state)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"{ckpt_dir / tag}: weights do not match the saved config: {e}") from None
    rank0 = checkpoint.load_rank_state(ckpt_dir, tag, 0)
    history = state.get("history", [])
    metrics = {"steps": state["step"], "epoch": state["epoch"], "world_size": state["world_size"],
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--no-heads", action="store_true", help="publish the encoder only")
    ap.add_argument("--storage-options", default="{}", help="JSON passed to fsspec for OUT (e.g. endpoint_url)")
    a = ap.parse_args(argv)
    try:
        m = publish(a.checkpoint, a.out, include_heads=not a.no_heads, storage_options=json.loads(a.storage_options))
    except checkpoint.CheckpointError as e:
        print(f"publish: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"published {m['checkpoint']} (step {m['steps']}) -> {a.out}")


if __name__ == "__main__":
    main()
