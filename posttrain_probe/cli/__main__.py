"""``python -m posttrain_probe.cli`` runs the CLI."""

from posttrain_probe.cli.main import app

app()
