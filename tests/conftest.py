"""Fixtures shared by several test modules."""
import os

import pytest


@pytest.fixture
def restore_env():
    """finetune() exports RANK/WORLD_SIZE (as pre-training does); keep other tests' environment clean."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A 2-step pre-training run of the tiny model (its folder), shared by a module's tests."""
    from .launch_utils import pretrain_cmd, run

    out = tmp_path_factory.mktemp("pt")
    run(pretrain_cmd("train.max_steps=2", f"ckpt.dir={out}"))
    return out
