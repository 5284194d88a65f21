"""Hydra configs of segkit-deepmask; they join segkit's config groups (``model=sharpmask``)."""
