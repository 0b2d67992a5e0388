"""SimMTM in pure PyTorch: masking, encoders, the pre-training model, task heads, published weights."""
from .config import SimMTMConfig
from .encoder import Encoder, instance_norm
from .masking import bernoulli_mask, geometric_mask, make_views
from .hub import load_pretrained, load_simmtm, save_pretrained
from .simmtm import Gather, SimMTM

__all__ = ["SimMTMConfig", "Encoder", "instance_norm", "bernoulli_mask", "geometric_mask", "make_views",
           "Gather", "SimMTM", "load_pretrained", "load_simmtm", "save_pretrained"]
