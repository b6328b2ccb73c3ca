"""Where the files shardvision ships beside its code are: accelerate_configs/, ds_configs/, launchers/.

In a checkout they sit at the repository root, where the commands in the README name them. A
wheel has no repository around it, so setup.py puts them inside the `core` package
(core/accelerate_configs/, ...), and this module finds whichever copy came with the running code.
After `pip install shardvision`, from any directory:

    accelerate launch --config_file "$(python -m core.shipped accelerate_configs/deepspeed_zero2.yaml)" \\
        -m recipes.classification.train --config ...
"""

from __future__ import annotations

import os
import sys

_CORE = os.path.dirname(os.path.abspath(__file__))
# Only an installed wheel has core/ds_configs/; a checkout keeps the folders one level up.
ROOT = _CORE if os.path.isdir(os.path.join(_CORE, "ds_configs")) else os.path.dirname(_CORE)


def shipped_path(relative: str) -> str:
    """The shipped copy of `relative`, e.g. "ds_configs/zero2.json"."""
    return os.path.join(ROOT, relative)


def user_path(path: str) -> str:
    """A file the user named: as given when it exists (a relative path from the current
    directory), else the shipped file of that name. So `ds_configs/zero2.json`, and the accelerate
    configs' own relative deepspeed_config_file, work from any directory, installed or not."""
    if os.path.exists(path):
        return path
    shipped = shipped_path(path)
    return shipped if os.path.exists(shipped) else path


if __name__ == "__main__":
    # `python -m core.shipped NAME`: the path to give `accelerate launch --config_file`, `sbatch`...
    for name in sys.argv[1:]:
        if not os.path.exists(shipped_path(name)):
            sys.exit(f"no shipped file {name!r} under {ROOT}")
        print(shipped_path(name))
