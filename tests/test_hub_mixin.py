"""Hub conventions (issue 15, item 1): `from_pretrained` / `save_pretrained` / `push_to_hub` through
huggingface_hub's PyTorchModelHubMixin, with our checks kept (safetensors only, weights_sha256, non-finite
weights refused), for local folders, fsspec URLs and Hub ids; hf:// URLs wherever the project takes a URL.

This machine has no network, so the Hub itself is never reached: everything up to the transport is tested
with local folders, `memory://`, huggingface_hub's download and upload calls replaced by local stand-ins,
and the `hf` fsspec protocol served from memory (`fake_hf`). That real hf:// URLs reach huggingface_hub's
HfFileSystem is checked without opening any.
"""
import json
import shutil

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from huggingface_hub import HfFileSystem, PyTorchModelHubMixin

import data_pipeline.fs as data_fs
import models.hub as hub
from data_pipeline import load_split_array
from models import Encoder, SimMTM, load_pretrained, load_simmtm
from models.heads import Classifier, Forecaster
from trainer.config import REPO_ROOT
from trainer.publish import publish

from .test_finetune import TINY_MODEL

# Written by trainer/publish.py before this change (a 2-step pre-training run, --no-heads): old folders load.
PUBLISHED_V1 = REPO_ROOT / "tests" / "fixtures" / "published_v1"


class MemoryHub(MemoryFileSystem):
    """hf:// with the Hub's transport replaced by fsspec's memory store."""

    protocol = "hf"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).replace("hf://", "memory://", 1))


@pytest.fixture
def fake_hf(monkeypatch):
    """Every fsspec user in this process resolves hf:// to `MemoryHub` until the test ends."""
    fsspec.register_implementation("hf", MemoryHub, clobber=True)
    monkeypatch.setattr(data_fs, "_CACHE", {})  # no HfFileSystem cached by an earlier test
    yield
    fsspec.register_implementation("hf", HfFileSystem, clobber=True)


def tiny_models():
    torch.manual_seed(0)
    enc = Encoder(TINY_MODEL)
    return {"encoder": enc, "forecaster": Forecaster(enc, horizon=5, dropout=0.1),
            "classifier": Classifier(Encoder(TINY_MODEL), num_classes=3, pool="mean")}


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(4, 2, TINY_MODEL.seq_len)
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x[:, 0]), b(x[:, 0])) if isinstance(a, Encoder) else torch.equal(a(x), b(x))


def test_published_models_are_hub_mixin_models():
    for model in tiny_models().values():
        assert isinstance(model, PyTorchModelHubMixin)


def test_bundled_and_old_published_folders_load():
    """checkpoints/simmtm-foundation and a folder today's publish code wrote, by name, folder and URL."""
    for name in ("simmtm-foundation", str(PUBLISHED_V1), f"file://{PUBLISHED_V1}"):
        enc = Encoder.from_pretrained(name)
        x = torch.randn(2, enc.cfg.seq_len)
        assert torch.equal(enc(x), load_pretrained(name)(x))
        assert "pretraining" in enc.hub_config and "weights_sha256" not in enc.hub_config


@pytest.mark.parametrize("where", ["folder", "memory"])
@pytest.mark.parametrize("kind", ["encoder", "forecaster", "classifier"])
def test_save_and_from_pretrained_roundtrip(kind, where, tmp_path):
    model = tiny_models()[kind]
    dest = str(tmp_path / kind) if where == "folder" else f"memory://roundtrip/{kind}"
    model.save_pretrained(dest, config={"note": {"by": "test"}})
    back = type(model).from_pretrained(dest)
    assert same_outputs(model, back) and not back.training
    cfg = json.loads(hub.read_bytes(hub.join(dest, hub.CONFIG)))
    assert cfg["note"] == {"by": "test"} and len(cfg["weights_sha256"]) == 64
    assert ("task" in cfg) == (kind != "encoder")
    again = f"memory://roundtrip/{kind}-again"
    back.save_pretrained(again)  # a loaded model keeps the sections it does not own
    assert json.loads(hub.read_bytes(hub.join(again, hub.CONFIG)))["note"] == {"by": "test"}


def test_task_models_hold_their_head_and_load_as_encoders(tmp_path):
    m = tiny_models()
    m["forecaster"].save_pretrained(tmp_path / "f")
    m["classifier"].save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["task"] == {"kind": "classify", "num_classes": 3, "dropout": 0.0, "pool": "mean"}
    assert same_outputs(m["forecaster"].encoder, Encoder.from_pretrained(tmp_path / "f"))  # its encoder alone
    assert Encoder.from_pretrained(tmp_path / "f").hub_config is None  # a forecaster's sections are not its own
    with pytest.raises(ValueError, match=r"/f: a 'forecast' model, not a 'classify' model"):
        Classifier.from_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="no 'task' section: a pre-trained encoder"):
        Forecaster.from_pretrained("simmtm-foundation")


def test_checks_hold_for_every_loader(tmp_path):
    """Tampered weights, an unverifiable folder and NaN weights are refused by name, whatever loads them."""
    folder = tmp_path / "model"
    tiny_models()["forecaster"].save_pretrained(folder)
    loaders = (Forecaster.from_pretrained, Encoder.from_pretrained, load_pretrained, hub.load_state)
    good = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(good[:-4] + bytes(4))
    for load in loaders:
        with pytest.raises(ValueError, match="model.safetensors: content differs from the weights_sha256"):
            load(str(folder))
    (folder / "model.safetensors").write_bytes(good)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "weights_sha256"}))
    for load in loaders:
        with pytest.raises(ValueError, match="no weights_sha256.*allow_unverified=True"):
            load(str(folder))
    assert Forecaster.from_pretrained(folder, allow_unverified=True) is not None
    nan = tiny_models()["forecaster"]
    with torch.no_grad():
        nan.head.linear.weight[0, 0] = float("nan")
    nan.save_pretrained(folder)
    for load in loaders:
        with pytest.raises(ValueError, match="tensor head.linear.weight .*NaN or inf"):
            load(str(folder))


def test_hub_id_downloads_through_huggingface_hub_then_checks(tmp_path, monkeypatch):
    """An owner/name id that is no local path goes to huggingface_hub.snapshot_download (here a stand-in
    serving a local folder) with the caller's revision; the download is checked like any folder."""
    repo = tmp_path / "snapshot"
    model = tiny_models()["forecaster"]
    model.save_pretrained(repo)
    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(repo)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # "someone/simmtm-tiny" is no folder here
    assert same_outputs(model, Forecaster.from_pretrained("someone/simmtm-tiny", revision="v1"))
    assert calls == [("someone/simmtm-tiny", {"allow_patterns": ["config.json", "model.safetensors"],
                                              "revision": "v1"})]
    (repo / "model.safetensors").write_bytes((repo / "model.safetensors").read_bytes()[:-4] + bytes(4))
    with pytest.raises(ValueError, match="content differs from the weights_sha256"):
        load_pretrained("someone/simmtm-tiny")


def test_unreachable_hub_id_is_a_clear_file_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # whatever the network
    with pytest.raises(FileNotFoundError, match="nobody/nothing: no such local folder, and not loadable from the "
                                                "Hugging Face Hub"):
        Encoder.from_pretrained("nobody/nothing")


def test_push_to_hub_uploads_the_checked_folder(monkeypatch):
    """The mixin's push_to_hub saves through our save_pretrained: the upload is the verified format."""
    seen = {}

    def upload_folder(self, *, repo_id, folder_path, **kw):
        seen["files"] = sorted(p.name for p in folder_path.iterdir())
        seen["model"] = Forecaster.from_pretrained(folder_path)
        return "commit-url"
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id}))
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    model = tiny_models()["forecaster"]
    assert model.push_to_hub("someone/simmtm-tiny") == "commit-url"
    assert seen["files"] == ["config.json", "model.safetensors"] and same_outputs(model, seen["model"])


def test_hf_urls_reach_huggingface_hubs_filesystem():
    """Without opening anything: the hf protocol is huggingface_hub's, in fsspec and in the data pipeline."""
    assert fsspec.get_filesystem_class("hf") is HfFileSystem
    fs, path = data_fs.filesystem("hf://datasets/someone/etth1@main/ETTh1.csv")
    assert isinstance(fs, HfFileSystem) and path == "datasets/someone/etth1@main/ETTh1.csv"
    assert hub._is_url("hf://someone/simmtm-tiny") and hub.locate("hf://someone/simmtm-tiny") == "hf://someone/simmtm-tiny"


def test_hf_urls_everywhere_up_to_the_transport(fake_hf, pretrained_run, tmp_path):
    """ckpt.publish / trainer/publish.py OUT, loading, save_pretrained and data.source all take hf:// URLs."""
    publish(pretrained_run, "hf://someone/simmtm-tiny")
    publish(pretrained_run, str(tmp_path / "local"))
    for load in (load_pretrained, load_simmtm):
        a, b = load("hf://someone/simmtm-tiny"), load(str(tmp_path / "local"))
        assert type(a) is type(b) and all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert isinstance(load_simmtm("hf://someone/simmtm-tiny"), SimMTM)
    assert fsspec.filesystem("hf").cat_file("hf://someone/simmtm-tiny/README.md").startswith(b"# SimMTM")
    tiny_models()["classifier"].save_pretrained("hf://someone/classifier@main/v2")
    assert Classifier.from_pretrained("hf://someone/classifier@main/v2").head.linear.out_features == 3
    fsspec.filesystem("hf").pipe_file("hf://datasets/someone/etth1/ETTh1.csv", (REPO_ROOT / "data/ETTh1.csv").read_bytes())
    for split in ("train", "test"):
        remote = load_split_array("hf://datasets/someone/etth1/ETTh1.csv", split, 48, cache_dir=str(tmp_path / "c"))
        local = load_split_array(str(REPO_ROOT / "data/ETTh1.csv"), split, 48, cache_dir=str(tmp_path / "c"))
        assert (remote == local).all()
    shutil.rmtree(tmp_path / "c")
