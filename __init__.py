"""ComfyUI custom-node entry point of quadtree-vae ("Quadtree VAE Encode" / "Quadtree VAE Decode").

Install: clone this repository into ``ComfyUI/custom_nodes/`` and run ``pip install -e .`` in it with
ComfyUI's Python. ComfyUI imports this file as a package and reads ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS``; the nodes themselves live in ``quadtree_vae/comfy.py``.

The installed ``quadtree_vae`` package is used when there is one (``pip install -e .`` makes it this
checkout), so that ComfyUI, scripts and other nodes share one copy of it; without an install the
package is imported from this directory through a relative import. Nothing here imports ComfyUI.
"""

try:
    from quadtree_vae.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as _absolute_error:
    # Not installed: import it relative to this package (custom_nodes/<this repo>/quadtree_vae).
    if not __package__:
        raise
    try:
        from .quadtree_vae.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    except ImportError as _relative_error:
        raise ImportError(
            "quadtree-vae ComfyUI nodes: could not import the quadtree_vae package "
            f"({_absolute_error}; {_relative_error}). Run `pip install -e .` in this folder with ComfyUI's "
            "Python (it needs torch, diffusers and safetensors)."
        ) from _relative_error

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
