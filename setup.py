"""Package layout that pyproject.toml alone cannot say: the user-editable YAML folders at the
repository root (``device_profiles/``, ``search_spaces/``, ``run_configs/``) ship inside the
wheel as ``autoprune/shipped/<folder>/``, where :func:`autoprune.config.shipped_dir` reads them.

They stay at the root because they are the files users read and copy; a ``package-dir`` mapping
puts them in the package at build time (metadata, extras and scripts live in pyproject.toml).
"""

from setuptools import find_packages, setup

#: Repository folder -> package that carries it in the wheel (``autoprune.config.SHIPPED_FOLDERS``).
SHIPPED = {f"autoprune.shipped.{folder}": folder for folder in ("device_profiles", "search_spaces", "run_configs")}

setup(
    packages=find_packages(include=["autoprune", "autoprune.*"]) + sorted(SHIPPED),
    package_dir=SHIPPED,
    # infer_example.py is copied into every deploy bundle (autoprune.deploy.bundle).
    package_data={"autoprune": ["deploy/templates/*.py"], **{pkg: ["*.yaml"] for pkg in SHIPPED}},
)
