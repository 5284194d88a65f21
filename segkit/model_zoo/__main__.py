"""``python -m segkit.model_zoo``: the ``segkit-zoo`` command line (:mod:`.cli`)."""
import sys

from .cli import main

sys.exit(main())
