"""Model zoo: published checkpoints as ready segkit models.

* :func:`get` builds a catalog entry's model with its weights (downloaded, checked, converted
  once, cached); :func:`list_models`, :func:`entry`, :func:`fetch` and
  :func:`checkpoint_path` give the names, the entries and the files.
* The catalog (``model_zoo/catalog.yaml``, format in ``model_zoo/README.md``) is read by
  :mod:`.catalog`; files live in the cache as :mod:`.store` describes; :mod:`.download` does
  the verified, atomic, locked HTTP downloads; ``segkit-zoo`` is :mod:`.cli`.
"""
from segkit.model_zoo.api import checkpoint_path, entry, fetch, get, list_models
from segkit.model_zoo.catalog import (Catalog, CatalogError, UnknownModelError, ZooEntry,
                                      ZooError, load_catalog)
from segkit.model_zoo.download import DownloadError, cache_dir, download, file_sha256

__all__ = [
    "Catalog", "CatalogError", "DownloadError", "UnknownModelError", "ZooEntry", "ZooError",
    "cache_dir", "checkpoint_path", "download", "entry", "fetch", "file_sha256", "get",
    "list_models", "load_catalog",
]
