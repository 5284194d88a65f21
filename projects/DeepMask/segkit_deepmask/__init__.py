"""segkit-deepmask: DeepMask and SharpMask object proposals (papers.md sections 1-3).

Importing the package registers every component into segkit's registries (see
:mod:`segkit_deepmask.modeling`); segkit does it on its own through the ``segkit.plugins``
entry point the first time a ``deepmask.*`` name is looked up. The ``configs`` sub-package
joins Hydra's search path, so ``model=sharpmask`` composes once the package is installed.
"""
from . import modeling  # noqa: F401  (registers the models)
from . import data  # noqa: F401  (registers the patch sampler's components)

__version__ = "0.1.0"
