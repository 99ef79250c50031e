"""``python -m quadtree_vae``: the ``qvae`` command."""

import sys

from .cli import main

sys.exit(main())
