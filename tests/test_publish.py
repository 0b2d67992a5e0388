"""Publishing checkpoints as safetensors folders and loading them back with torch + safetensors only."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from models import SimMTM, SimMTMConfig, load_pretrained, load_simmtm
from tests.s3_server import s3  # noqa: F401 - session fixture
from trainer.publish import publish

from .launch_utils import deepspeed_cmd, free_port, pretrain_cmd, run, summary


def digest(module) -> str:
    """Same recipe as trainer.distributed.parameter_digest."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    pub = out / "published-at-end"
    run(pretrain_cmd("train.max_steps=6", f"ckpt.dir={out}", f"ckpt.publish={pub}"))
    return out, pub


def test_publish_folder_contents(plain_run, tmp_path):
    out, _ = plain_run
    dest = tmp_path / "model"
    metrics = publish(out, str(dest))
    assert {p.name for p in dest.iterdir()} == {"model.safetensors", "config.json", "README.md", "metrics.json"}
    cfg = json.loads((dest / "config.json").read_text())
    run_cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == run_cfg["model"]
    assert cfg["pretraining"]["data"]["source"] == run_cfg["data"]["source"]
    assert cfg["steps"] == 6 and len(cfg["data_manifest_hash"]) >= 16 and cfg["code_version"]
    card = (dest / "README.md").read_text()
    for section in ("## Data", "## Architecture", "## Pre-training", "## Intended use", "## How to fine-tune"):
        assert section in card
    assert cfg["data_manifest_hash"] in card
    assert "6 optimizer steps" in card and f"-> {metrics['last']['loss_rec']:.4f}" in card  # steps, final losses
    assert "init=THIS_FOLDER_OR_URL" in card  # the fine-tuning command it documents is the real one
    m = json.loads((dest / "metrics.json").read_text())
    assert m["steps"] == 6 and m["last"]["loss_rec"] == metrics["last"]["loss_rec"]


def test_load_pretrained_reproduces_training_time_encoder(plain_run, tmp_path):
    out, published_at_end = plain_run
    ck = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    cfg = SimMTMConfig(**json.loads((out / "config.json").read_text())["model"])
    trained = SimMTM(cfg)
    trained.load_state_dict(load_file(str(ck / "model.safetensors")))
    trained.eval()
    enc = load_pretrained(str(published_at_end))  # published by the run itself (ckpt.publish)
    x = torch.randn(5, cfg.seq_len)
    assert torch.equal(enc(x), trained.encoder(x))
    assert digest(load_simmtm(str(published_at_end))) == digest(trained)


def test_encoder_only_publish(plain_run, tmp_path):
    out, _ = plain_run
    publish(out, str(tmp_path / "enc"), include_heads=False)
    assert all(k.startswith("encoder.") for k in load_file(str(tmp_path / "enc" / "model.safetensors")))
    load_pretrained(str(tmp_path / "enc"))
    with pytest.raises(ValueError, match="full SimMTM model"):
        load_simmtm(str(tmp_path / "enc"))


def test_zero2_shards_consolidate_exactly(tmp_path):
    out = tmp_path / "z2"
    run(deepspeed_cmd("--num_gpus", "2", "--master_port", str(free_port()),
                      script_args=["dist.zero_stage=2", "train.max_steps=4", f"ckpt.dir={out}"]))
    publish(out, str(tmp_path / "pub"))
    assert digest(load_simmtm(str(tmp_path / "pub"))) == summary(out)["parameter_digests"][0]


def test_publish_to_and_load_from_s3(plain_run, s3):  # noqa: F811
    out, local = plain_run
    url = f"s3://{s3['new_bucket']('models')}/simmtm/etth1"
    publish(out, url, storage_options=s3["storage_options"])
    enc = load_pretrained(url, storage_options=s3["storage_options"])
    x = torch.randn(3, enc.cfg.seq_len)
    assert torch.equal(enc(x), load_pretrained(str(local))(x))


def test_truncated_or_tampered_weights_are_rejected(plain_run, tmp_path):
    out, _ = plain_run
    dest = tmp_path / "bad"
    publish(out, str(dest))
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a valid safetensors file"):
        load_pretrained(str(dest))
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_pretrained(str(dest))
    (dest / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_pretrained(str(dest))


def test_edited_weights_fail_the_recorded_digest(plain_run, tmp_path):
    out, _ = plain_run
    dest = tmp_path / "edited"
    publish(out, str(dest))
    weights = dest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # still a valid file: one tensor value changed
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors: content differs from the weights_sha256"):
        load_pretrained(str(dest))


def test_publish_cli_and_loading_without_deepspeed_or_pickle(plain_run, tmp_path):
    """`python trainer/publish.py CHECKPOINT OUT`, then load_pretrained in a fresh interpreter where
    importing deepspeed fails and torch.load raises: only torch + safetensors are used."""
    import subprocess
    import sys

    from trainer.config import REPO_ROOT

    out, _ = plain_run
    dest = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "trainer/publish.py", str(out), str(dest), "--no-heads"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "published" in proc.stdout and (dest / "README.md").exists()
    code = ("import sys, torch\n"
            "sys.modules['deepspeed'] = None\n"
            "def no(*a, **k): raise AssertionError('torch.load used')\n"
            "torch.load = no\n"
            "from models import load_pretrained\n"
            f"enc = load_pretrained({str(dest)!r})\n"
            "print('ok', sum(p.numel() for p in enc.parameters()))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr
    bad = subprocess.run([sys.executable, "trainer/publish.py", str(tmp_path / "nothing"), str(tmp_path / "x")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "neither a complete checkpoint folder nor a run with checkpoints" in bad.stderr
