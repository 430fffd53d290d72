"""`python -m orpo_dist.generate MODEL --prompt ...` runs the generation command (orpo_dist.generation).

The Python API is the function `orpo_dist.generate(model_dir, prompts, **options)`. Importing this module
(rather than running it) would bind the package attribute `generate` to the module and hide that
function, so the module stands aside for it, as orpo_dist/train.py does.
"""

import sys

import orpo_dist
from orpo_dist.generation import main

if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__] = orpo_dist.generate
