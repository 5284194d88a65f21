"""Catalog data of segkit's model zoo, installed as the package ``segkit.model_zoo_catalog``
(``catalog.yaml``; read by :mod:`segkit.model_zoo.catalog`)."""
