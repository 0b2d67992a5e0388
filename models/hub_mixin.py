"""huggingface_hub's model conventions (`from_pretrained`, `save_pretrained`, `push_to_hub`) on our checked
format: every source goes through `models.hub.load_state` (safetensors only, sha256-verified, non-finite
refused). Its own module so models/encoder.py and models/heads.py can carry it without importing hub.py,
which imports them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from huggingface_hub import PyTorchModelHubMixin

from .config import SimMTMConfig


class HubMixin(PyTorchModelHubMixin, library_name="simmtm", tags=["time-series", "simmtm"],
               paper_url="https://arxiv.org/abs/2302.00861"):
    """`from_pretrained` / `save_pretrained` in our checked format for the published models. A model keeps the
    config.json it was loaded from in `hub_config`, so saving it again keeps the sections it does not own
    (pre-training provenance, what prediction needs)."""

    PREFIX = ""  # where this module's weights sit in the folder's state dict ("encoder." for the encoder)
    hub_config: Optional[dict] = None

    def config_sections(self) -> dict:
        """The config.json sections that rebuild this module ("model", and "task" for task models)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: SimMTMConfig, config: dict, folder: str):
        """An untrained module of the architecture `cfg` and the rest of config.json."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, storage_options: Optional[dict] = None,
                        allow_unverified: bool = False, **hub_kwargs):
        """From a local folder, an fsspec URL (hf://owner/name/sub/folder included), a bundled model's name
        or a Hub repository id; `hub_kwargs` (revision, token, cache_dir, local_files_only...) go to
        huggingface_hub for a Hub id, `storage_options` to fsspec for a URL."""
        from .hub import WEIGHTS, join, load_state, locate

        folder = locate(str(pretrained_model_name_or_path), **hub_kwargs)
        cfg, state, config = load_state(folder, storage_options, allow_unverified)
        model = cls.from_config(cfg, config, folder)
        own = {k[len(cls.PREFIX):]: v for k, v in state.items() if k.startswith(cls.PREFIX)}
        try:
            model.load_state_dict(own, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{join(folder, WEIGHTS)}: weights do not match the {cls.__name__} config.json "
                             f"describes: {e}") from None
        if ("task" in config) == ("task" in model.config_sections()):  # the folder describes this very module
            model.hub_config = {k: v for k, v in config.items() if k != "weights_sha256"}
        return model.eval()

    def save_pretrained(self, save_directory: str | Path, *, config: Optional[dict] = None,
                        storage_options: Optional[dict] = None, model_card_kwargs: Optional[dict] = None) -> None:
        """Weights and config.json to a local folder or any fsspec URL (hf://owner/name commits to the Hub);
        `config`: extra config.json sections. `model_card_kwargs` is accepted for the mixin's `push_to_hub`,
        which saves through here: model cards are written by trainer/publish.py."""
        from .hub import write_folder

        state = {self.PREFIX + k: v for k, v in self.state_dict().items()}
        write_folder(str(save_directory), state, {**(self.hub_config or {}), **(config or {}),
                                                  **self.config_sections()}, storage_options)
