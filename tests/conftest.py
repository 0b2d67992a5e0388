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
