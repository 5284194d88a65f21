"""segkit: object detection and instance segmentation, from DeepMask to Mask^X R-CNN.

Importing ``segkit`` is light; sub-packages (``segkit.modeling``, ``segkit.data``, ...) register
their components when imported, and ``segkit.config.compose`` / ``build_model`` import what
they need.
"""
__version__ = "0.1.0"
