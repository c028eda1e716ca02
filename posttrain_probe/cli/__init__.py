"""The ``posttrain-probe`` command line: :data:`app` lives in :mod:`posttrain_probe.cli.main`, which
imports one module per group of commands (``activations``, ``crosscoder``, ``analysis``, ``eval``,
``generalization``, ``fisher``, ``blocking``, ``testing``); options of step commands are generated from
the steps' config dataclasses by :mod:`posttrain_probe.cli.options`."""

from posttrain_probe.cli.main import app

__all__ = ["app"]
