"""quadtree-vae: exact tiled encode/decode for diffusion VAEs under a memory budget.

>>> import quadtree_vae as qv
>>> z = qv.encode(vae, x, tile=256)      # == vae.encode(x).latent_dist.mode(), up to float rounding
>>> y = qv.decode(vae, z, budget="4GB")  # == vae.decode(z).sample
"""

from .api import decode, encode, plan
from .dataset import DatasetReport, encode_dataset
from .distributed import Ranks
from .errors import (
    InvalidInputError,
    LoadError,
    NonFiniteOutputError,
    QuadtreeVAEError,
    UnsupportedArchitectureError,
)
from .hooks import disable, enable, tiled
from .loading import load_vae, random_vae
from .planner import Plan, Segment

__version__ = "0.1.0"

__all__ = [
    "DatasetReport",
    "InvalidInputError",
    "LoadError",
    "NonFiniteOutputError",
    "Plan",
    "QuadtreeVAEError",
    "Ranks",
    "Segment",
    "UnsupportedArchitectureError",
    "decode",
    "disable",
    "enable",
    "encode",
    "encode_dataset",
    "load_vae",
    "plan",
    "random_vae",
    "tiled",
]
