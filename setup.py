"""Package discovery for posttrain-probe (metadata lives in pyproject.toml).

The top-level folder `callbacks/` ships as `posttrain_probe.callbacks` and `recipes/` as
`posttrain_probe.recipes` (with its configs, so `posttrain-probe demo` runs from a wheel); sub-packages added under
either folder are picked up without editing this file. `callbacks/verl/hydra_plugins/` ships as
Hydra's `hydra_plugins` namespace package (no __init__.py): Hydra finds search-path plugins only
there. Listing the namespace itself keeps it a real directory in the editable install too, where
Hydra's plugin scan (pkgutil.walk_packages over `hydra_plugins.__path__`) can see it.
"""

from setuptools import find_packages, setup

core = find_packages(include=["posttrain_probe", "posttrain_probe.*"])
callbacks = ["posttrain_probe." + name for name in find_packages(include=["callbacks", "callbacks.*"])]
recipes = ["posttrain_probe.recipes"]
hydra_plugins = ["hydra_plugins"] + [
    "hydra_plugins." + name for name in find_packages(where="callbacks/verl/hydra_plugins")
]
setup(
    packages=core + callbacks + recipes + hydra_plugins,
    package_dir={
        "posttrain_probe.callbacks": "callbacks",
        "posttrain_probe.recipes": "recipes",
        "hydra_plugins": "callbacks/verl/hydra_plugins",
    },
)
