"""Package layout: the four top-level folders install under one namespace, `trimkit`.

Every subpackage below them is found by discovery, so a wheel (`pip install .`) holds all of them;
the project's metadata lives in pyproject.toml.
"""
from setuptools import find_packages, setup

ROOTS = {"trimkit": "trimkit", "trimkit.passes": "passes", "trimkit.backbones": "backbones", "trimkit.cli": "cli"}


def _packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


# Shipped trained models (trimkit.backbones.trained): weights, config and their record.
PACKAGE_DATA = {"trimkit.backbones": ["trained/*/*.json", "trained/*/*.safetensors"]}

setup(package_dir=dict(ROOTS), packages=_packages(), package_data=PACKAGE_DATA)
