"""The config tree: YAML + overrides, typed, with errors that name the key."""
import pytest

from trainer.config import REPO_ROOT, Config, ConfigError, load_config, split_cli


def test_reference_config_matches_spec():
    c = load_config(REPO_ROOT / "configs/etth1.yaml")
    m = c.model
    assert (m.seq_len, m.e_layers, m.n_heads, m.d_model, m.d_ff, m.num_views) == (336, 3, 16, 32, 64, 3)
    assert (m.mask_ratio, m.mask_lm, m.temperature, m.mask) == (0.5, 3.0, 0.2, "geometric")
    assert (c.optim.lr, c.train.batch_size, c.train.epochs) == (1e-3, 16, 50)


def test_overrides_and_types():
    c = load_config(REPO_ROOT / "configs/etth1.yaml", ["train.batch_size=4", "model.temperature=0.1",
                                                       "data.storage_options={endpoint_url: http://x}",
                                                       "optim.betas=[0.8, 0.9]", "train.progress=false", "optim.lr=1e-3"])
    assert c.train.batch_size == 4 and c.model.temperature == 0.1 and c.optim.betas == (0.8, 0.9)
    assert c.data.storage_options == {"endpoint_url": "http://x"} and c.train.progress is False
    assert isinstance(load_config(), Config)


@pytest.mark.parametrize("override,message", [
    ("model.d_modle=8", "model.d_modle: unknown key; did you mean 'd_model'"),
    ("train.batch_size=abc", "train.batch_size: expected an integer"),
    ("train.batch_size=1.5", "train.batch_size: expected an integer"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("model.mask=zeros", "model.mask: 'zeros' is not one of"),
    ("model.n_heads=5", "d_model (32) must be divisible by n_heads (5)"),
    ("model.mask_ratio=1.5", "mask_ratio must be in (0, 1)"),
    ("model.mask_ratio=0.8", "geometric masks need mask_lm * (1 - mask_ratio) / mask_ratio >= 1"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("nonsense", "expected key=value"),
    ("model=3", "model: expected a mapping"),
    ("optim.betas=[0.9]", "optim.betas: expected 2 items"),
])
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO_ROOT / "configs/etth1.yaml", [override])
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_cli_split_tolerates_launcher_flags():
    assert split_cli(["--local_rank=1", "--config", "a.yaml", "x=1"]) == ("a.yaml", ["x=1"])
    assert split_cli(["--config=b.yaml", "--local_rank", "0"]) == ("b.yaml", [])
