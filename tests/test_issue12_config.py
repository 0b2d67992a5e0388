"""Issue 12, item 7: every config value is validated once, with the section and key named."""
from __future__ import annotations

import pytest

from trainer.config import ConfigError, load_config

BAD = [
    ("train.batch_size=0", "train: batch_size"),
    ("train.batch_size=-4", "train: batch_size"),
    ("train.grad_accum=0", "train: grad_accum"),
    ("train.log_every=0", "train: log_every"),
    ("train.max_steps=-5", "train: max_steps"),
    ("train.epochs=-1", "train: epochs"),
    ("train.seed=-1", "train: seed"),
    ("train.num_threads=-2", "train: num_threads"),
    ("model.seq_len=100000", "model: seq_len"),
    ("optim.lr=-1", "optim: lr"),
    ("optim.lr=0", "optim: lr"),
    ("optim.lr=.nan", "optim: lr"),
    ("optim.lr=.inf", "optim: lr"),
    ("optim.weight_decay=-0.1", "optim: weight_decay"),
    ("optim.warmup_steps=-3", "optim: warmup_steps"),
    ("optim.grad_clip=-1", "optim: grad_clip"),
    ("optim.min_lr_ratio=2", "optim: min_lr_ratio"),
    ("optim.betas=[0.9,1.5]", "optim: betas[1]"),
    ("dist.zero_stage=7", "dist: zero_stage"),
    ("dist.zero_stage=-2", "dist: zero_stage"),
    ("ckpt.every=-1", "ckpt: every"),
    ("ckpt.keep=-1", "ckpt: keep"),
    ("log.image_every=-1", "log: image_every"),
    ("model.temperature=.nan", "model: temperature"),
    ("model.mask_lm=.nan", "model: mask_lm"),
    ("data.io_timeout=0", "data: io_timeout"),
    ("data.io_timeout=.nan", "data: io_timeout"),
    ("data.retry_backoff=.nan", "data: retry_backoff"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value), str(e.value)


def test_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match=r"train: epochs and max_steps are both 0"):
        load_config(None, ["train.epochs=0", "train.max_steps=0"])


def test_good_values_still_load():
    cfg = load_config(None, ["train.epochs=0", "train.max_steps=5", "optim.warmup_steps=0", "ckpt.keep=0",
                             "dist.zero_stage=3", "train.seed=0", "model.seq_len=512", "data.io_timeout=5"])
    assert cfg.train.max_steps == 5 and cfg.dist.zero_stage == 3 and cfg.data.io_timeout == 5.0
