"""`python -m orpo_dist.train ...` runs the command line (orpo_dist.cli); see `--help`.

The Python API is the function `orpo_dist.train(config, **overrides)`. Importing this module (rather
than running it) would bind the package attribute `train` to the module and hide that function, so the
module stands aside for it: `import orpo_dist.train` gives the function.
"""

import sys

import orpo_dist
from orpo_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__] = orpo_dist.train
