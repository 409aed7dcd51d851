"""Tiny embedded model configs (random seeded weights, no downloads) for the demo and tests."""

from autodeploy.models.zoo import ZOO, build_model, zoo_names

__all__ = ["ZOO", "build_model", "zoo_names"]
