"""Published weights in the Hugging Face layout: `model.safetensors` + `config.json`, in a local folder, at
any fsspec URL (s3://, memory://, hf://...) or in a Hugging Face Hub repository (`owner/name`).

Why our own `from_pretrained` on huggingface_hub's `PyTorchModelHubMixin`: the mixin gives the models the
conventions users of other time-series foundation models expect (`Model.from_pretrained`,
`save_pretrained`, `push_to_hub`), but loads whatever pickle or safetensors file it finds, unchecked, and
reads local folders and the Hub only. Here every source goes through `load_state`: safetensors only, the
weights verified against the `weights_sha256` in config.json, non-finite tensors refused, the file at
fault named. Loading needs no DeepSpeed and no pickle; bytes move through data_pipeline/fs.py (retries,
atomic writes), the project's one I/O layer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .encoder import Encoder
from .config import SimMTMConfig
from .simmtm import SimMTM

WEIGHTS, CONFIG = "model.safetensors", "config.json"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells repository ids


def _is_url(path: str) -> bool:
    from data_pipeline import fs  # imported when used: `import models` stays light

    return not fs.is_local(str(path))


# Through the data pipeline's I/O layer (bounded retries, atomic writes), without its per-operation deadline:
# weights can take longer than a shard; S3's socket timeouts still end a frozen request.
def write_bytes(path: str, data: bytes, storage_options: Optional[dict] = None) -> None:
    from data_pipeline import fs

    fs.atomic_write(str(path), data, storage_options, timeout=None)


def read_bytes(path: str, storage_options: Optional[dict] = None) -> bytes:
    from data_pipeline import fs

    return fs.read_bytes(str(path), storage_options, timeout=None)


def join(folder: str, name: str) -> str:
    return f"{str(folder).rstrip('/')}/{name}"


def config_from_dict(d: dict) -> SimMTMConfig:
    names = {f.name for f in dataclasses.fields(SimMTMConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"config.json: unknown model fields {sorted(unknown)}")
    cfg = SimMTMConfig(**d)
    cfg.validate()
    return cfg


def first_nonfinite(state: dict) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or inf (None: all finite)."""
    return next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def write_folder(folder: str, state: dict, config: dict, storage_options: Optional[dict] = None,
                 metadata: Optional[dict] = None) -> None:
    """fp32 `state` as model.safetensors, then `config` + the weights' digest as config.json (the config last:
    a folder whose config.json exists is complete)."""
    weights = st_save({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, metadata=metadata)
    write_bytes(join(folder, WEIGHTS), weights, storage_options)
    # The weights' digest in the config: a file whose tensors were edited still parses, this catches it.
    config = {**config, "weights_sha256": hashlib.sha256(weights).hexdigest()}
    write_bytes(join(folder, CONFIG), json.dumps(config, indent=2).encode(), storage_options)


def save_pretrained(model: SimMTM, folder: str, extra: Optional[dict] = None, include_heads: bool = True,
                    storage_options: Optional[dict] = None) -> None:
    """Publish a SimMTM model: fp32 weights (encoder, and optionally the pre-training heads) and the
    architecture, plus `extra` config sections."""
    state = {k: v for k, v in model.state_dict().items() if include_heads or k.startswith("encoder.")}
    write_folder(folder, state, {"model": dataclasses.asdict(model.cfg), **(extra or {})}, storage_options,
                 {"format": "simmtm", "include_heads": str(include_heads)})


BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints"  # models shipped with the repository


def resolve(folder: str) -> str:
    """A published folder/URL as given, or the name of a bundled model (`checkpoints/<name>/`)."""
    folder = str(folder)
    if _is_url(folder) or Path(folder).exists() or "/" in folder.strip("/"):
        return folder
    bundled = BUNDLED / folder
    if (bundled / CONFIG).exists():
        return str(bundled)
    return folder


def locate(name: str, **hub_kwargs) -> str:
    """`resolve`, then a Hub repository id that is no local path -> its snapshot in the Hugging Face cache.
    `hub_kwargs`: huggingface_hub.snapshot_download's (revision, token, cache_dir, local_files_only...)."""
    folder = resolve(name)
    if _is_url(folder) or Path(folder).exists() or not REPO_ID.fullmatch(folder):
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(folder, allow_patterns=[CONFIG, WEIGHTS], **hub_kwargs)
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        raise FileNotFoundError(f"{folder}: no such local folder, and not loadable from the Hugging Face Hub "
                                f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


def load_state(folder: str, storage_options: Optional[dict] = None,
               allow_unverified: bool = False) -> tuple[SimMTMConfig, dict, dict]:
    """(architecture, fp32 state dict, the whole config.json) with clear errors for bad files.
    `folder`: a local folder, an fsspec URL, a bundled model's name or a Hub repository id (see `locate`).
    Weights without a recorded weights_sha256 cannot be told from edited ones: refused unless
    `allow_unverified`. Non-finite weights are always refused: they only ever come from a diverged run."""
    folder = locate(folder)
    cfg_path, w_path = join(folder, CONFIG), join(folder, WEIGHTS)
    try:
        config = json.loads(read_bytes(cfg_path, storage_options))
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_path}: not found (is {folder} a published SimMTM folder?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if "model" not in config:
        raise ValueError(f"{cfg_path}: no 'model' section")
    cfg = config_from_dict(config["model"])
    try:
        data = read_bytes(w_path, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{w_path}: not found") from None
    try:
        state = st_load(data)
    except (SafetensorError, Exception) as e:  # truncated or tampered files fail to parse here
        raise ValueError(f"{w_path}: not a valid safetensors file ({len(data)} bytes): {e}") from None
    want = config.get("weights_sha256")
    if want is None and not allow_unverified:
        raise ValueError(f"{folder}: {CONFIG} records no weights_sha256, so {WEIGHTS} cannot be verified; "
                         f"load it anyway with allow_unverified=True (only a folder you trust)")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{w_path}: content differs from the weights_sha256 in {CONFIG} "
                         f"(tampered with or corrupted)")
    bad = first_nonfinite(state)
    if bad is not None:
        raise ValueError(f"{folder}: tensor {bad} in {WEIGHTS} holds NaN or inf (a diverged run); refusing it")
    return cfg, state, config


def load_pretrained(folder: str, storage_options: Optional[dict] = None,
                    allow_unverified: bool = False) -> Encoder:
    """Rebuild the pre-trained encoder (`Encoder.from_pretrained`). Input [N, L] univariate series
    (instance-normalised as in pre-training) -> [N, T, d] tokens. `allow_unverified`: see `load_state`."""
    return Encoder.from_pretrained(folder, storage_options=storage_options, allow_unverified=allow_unverified)


def load_simmtm(folder: str, storage_options: Optional[dict] = None,
                allow_unverified: bool = False) -> SimMTM:
    """The whole pre-training model (needs a folder published with the heads); `allow_unverified`: see
    `load_state`."""
    folder = locate(folder)
    cfg, state, _ = load_state(folder, storage_options, allow_unverified)
    model = SimMTM(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{join(folder, WEIGHTS)}: weights do not match a full SimMTM model: {e}") from None
    return model.eval()
