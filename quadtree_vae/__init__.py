"""quadtree-vae: exact tiled encode/decode for diffusion VAEs under a memory budget.

>>> import quadtree_vae as qv
>>> z = qv.encode(vae, x, tile=256)      # == vae.encode(x).latent_dist.mode(), up to float rounding
>>> y = qv.decode(vae, z, budget="4GB")  # == vae.decode(z).sample
>>> for frames in qv.decode_frames(vae, z, tile=512): ...  # videos: frames as they finish
"""

from .api import decode, encode, plan
from .dataset import DatasetReport, encode_dataset
from .distributed import Ranks
from .errors import (
    InvalidInputError,
    LoadError,
    NonFiniteOutputError,
    OutOfMemoryError,
    QuadtreeVAEError,
    UnsupportedArchitectureError,
)
from .hooks import disable, enable, tiled
from .loading import load_vae, random_vae
from .planner import Plan, Segment
from .stream import decode_frames, encode_frames

__version__ = "0.1.0"

__all__ = [
    "DatasetReport",
    "InvalidInputError",
    "LoadError",
    "NonFiniteOutputError",
    "OutOfMemoryError",
    "Plan",
    "QuadtreeVAEError",
    "Ranks",
    "Segment",
    "UnsupportedArchitectureError",
    "decode",
    "decode_frames",
    "disable",
    "enable",
    "encode",
    "encode_dataset",
    "encode_frames",
    "load_vae",
    "plan",
    "random_vae",
    "tiled",
]
