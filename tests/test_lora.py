"""LoRA fine-tuning (task.mode=lora): only adapters and head train, on both engines; the merged
export computes what the adapted model computes; the trainable-parameter count is reported."""
import pytest
import torch

import trainer.finetune as ftm
from models import Encoder
from models.heads import Forecaster
from trainer.config import load_config
from trainer.finetune import FinetuneConfig, TaskConfig, merged_for_export, with_lora

from .test_finetune import TINY_MODEL, _fit, _synthetic

pytestmark = pytest.mark.usefixtures("restore_env")  # tests/conftest.py

LORA = ["task.mode=lora", "task.lora_rank=2", "train.epochs=2", "task.patience=5", "task.head_warmup_epochs=0"]


@pytest.fixture
def initial(monkeypatch):
    """The state dict of the model finetune() builds, before any update."""
    snap, real = {}, ftm.build_model

    def spy(cfg, num_classes=0):
        model, arch = real(cfg, num_classes)
        snap.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, arch
    monkeypatch.setattr(ftm, "build_model", spy)
    return snap


def _changed(before: dict, after: dict) -> set:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}


@pytest.mark.parametrize("engine", [[], ["dist.deepspeed=true", "dist.zero_stage=2"]], ids=["torch", "deepspeed-zero2"])
def test_only_adapters_and_head_train(initial, engine):
    """Compare every tensor before and after training: the encoder's base weights (frozen) are bitwise
    unchanged, every LoRA B (zero at init) and the head moved. Under DeepSpeed ZeRO-2 the frozen weights
    are in no optimizer group."""
    r = _fit(_synthetic(2, 16), *LORA, *engine)
    assert r["engine"] == ("deepspeed" if engine else "torch") and r["steps"] > 0
    changed = _changed(initial, r["_model"].state_dict())
    assert changed and all(".lora_" in k or k.startswith("head.") for k in changed), changed
    assert all(k in changed for k in initial if ".lora_B." in k or k.startswith("head."))


def test_trainable_params_are_adapters_and_head():
    r = _fit(_synthetic(2, 16), *LORA)
    model = r["_model"]
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    # rank 2 on qkv (8 -> 24), out (8 -> 8), ff.0 (8 -> 16), ff.3 (16 -> 8): r * (in + out) each
    assert lora == 2 * ((8 + 24) + (8 + 8) + (8 + 16) + (16 + 8))
    assert r["trainable_params"] == lora + sum(p.numel() for p in model.head.parameters())
    full = _fit(_synthetic(2, 16), "train.epochs=1")
    assert r["trainable_params"] < full["trainable_params"]


def test_merged_export_equals_adapted_model():
    r = _fit(_synthetic(2, 16), *LORA)
    model = r["_model"].eval()
    merged = merged_for_export(model)
    x = torch.randn(5, 2, 48)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)
    # a plain Forecaster: its state dict loads into one built without peft; the trained model keeps its adapters
    plain = Forecaster(Encoder(TINY_MODEL), 8)
    plain.load_state_dict(merged.state_dict())
    assert any(".lora_" in k for k in model.state_dict()) and type(merged.encoder) is Encoder
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model(x), atol=1e-5, rtol=0)
    full = _fit(_synthetic(2, 16), "train.epochs=1")["_model"]
    assert merged_for_export(full) is full  # nothing to merge


def test_lora_targets_are_configurable_and_checked():
    cfg = load_config(None, ["task.lora_targets=[attn.qkv]", "task.lora_rank=4"], cls=FinetuneConfig)
    enc = with_lora(Encoder(TINY_MODEL), cfg.task)
    adapted = {n.split(".lora_A")[0] for n, _ in enc.named_parameters() if ".lora_A." in n}
    assert adapted == {"base_model.model.layers.0.attn.qkv"}
    with pytest.raises(ValueError, match=r"task.lora_targets=\['nope'\]"):
        with_lora(Encoder(TINY_MODEL), TaskConfig(lora_targets=["nope"]))
    with pytest.raises(ValueError, match="lora_rank"):
        TaskConfig(mode="lora", lora_rank=0).validate()


def test_readme_lora_command_runs(tmp_path):
    """The README's LoRA line as written (bundled model, data/ETTh1.csv), with a tiny budget appended."""
    import shlex
    import subprocess
    import sys

    from trainer.config import REPO_ROOT

    line = next(ln for ln in (REPO_ROOT / "README.md").read_text().splitlines() if "task.mode=lora" in ln
                and ln.startswith(".venv/bin/python"))
    cmd = [sys.executable if a == ".venv/bin/python" else a for a in shlex.split(line.replace("runs/", f"{tmp_path}/"))]
    cmd += ["train.max_steps=2", "data.window_stride=256", "task.val_stride=256", "task.test_stride=64",
            "train.progress=false"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mode=lora" in proc.stdout and "mase" in proc.stdout
