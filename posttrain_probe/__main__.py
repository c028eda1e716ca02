"""``python -m posttrain_probe`` runs the CLI (handy under ``torchrun ... -m posttrain_probe collect``)."""

from posttrain_probe.cli.main import app

app()
