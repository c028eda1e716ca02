"""Package discovery for posttrain-probe (metadata lives in pyproject.toml).

The top-level folder `callbacks/` ships as `posttrain_probe.callbacks`; sub-packages added under
either folder are picked up without editing this file.
"""

from setuptools import find_packages, setup

core = find_packages(include=["posttrain_probe", "posttrain_probe.*"])
callbacks = [
    "posttrain_probe." + name for name in find_packages(include=["callbacks", "callbacks.*"])
]
setup(
    packages=core + callbacks,
    package_dir={"posttrain_probe.callbacks": "callbacks"},
)
