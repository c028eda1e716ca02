"""CLI: ``crosscoder train``, ``crosscoder info`` and ``crosscoder calibrate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options
from posttrain_probe.crosscoder.config import CrosscoderConfig, CrosscoderTrainingConfig
from posttrain_probe.errors import ProbeError
from posttrain_probe.models import parse_model_specs


@user_errors
@config_options(crosscoder=CrosscoderConfig, training=CrosscoderTrainingConfig)
def crosscoder_train(
    acts: list[str] = typer.Option([], "--acts", help="A collect output directory, or one store directory per model (repeat)."),
    model: list[str] = typer.Option([], "--model", help="Live training: NAME=PATH per model (repeat), with --dataset."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Live training: dataset spec as for `collect`."),
    seq_len: int = typer.Option(512, "--seq-len", help="Live training: tokens per document."),
    forward_batch_size: int = typer.Option(8, "--forward-batch-size", help="Live training: documents per model forward."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory of the crosscoder run."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out."),
    crosscoder: CrosscoderConfig = None,  # type: ignore[assignment]
    training: CrosscoderTrainingConfig = None,  # type: ignore[assignment]
) -> None:
    """Train a crosscoder on paired activation stores (--acts) or live model forwards (--model ... --dataset)."""
    from posttrain_probe.crosscoder.sources import open_source
    from posttrain_probe.crosscoder.train import train_crosscoder

    if out is None:
        raise ProbeError("--out is required (the directory of the crosscoder run)")
    source = open_source(
        acts=acts, models=parse_model_specs(model) if model else None, dataset=dataset, layer=crosscoder.layer,
        model_names=crosscoder.model_names or None, seq_len=seq_len, forward_batch_size=forward_batch_size,
    )
    import warnings

    from posttrain_probe.crosscoder.inspect import training_status
    from posttrain_probe.crosscoder.train import CrosscoderQualityWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CrosscoderQualityWarning)  # printed below as plain lines
        train_crosscoder(source, crosscoder, training, out, resume=resume, overwrite=overwrite)
    status = training_status(out) or {}
    for problem in status.get("warnings", []):
        typer.secho(f"warning: {problem}", fg=typer.colors.YELLOW, err=True)
    if not status.get("complete", True):
        typer.echo(f"stopped at step {status['step']} of {status['total_steps']}: continue with --resume")
    typer.echo(f"crosscoder: {out}")


@user_errors
def crosscoder_info(
    path: Path = typer.Argument(..., help="Crosscoder directory (config.json + model.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Models, layer, size, normalisation scales, dead features and last training metrics of a crosscoder."""
    from posttrain_probe.crosscoder.inspect import crosscoder_summary

    info = crosscoder_summary(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:>18}: {value}")


@user_errors
def crosscoder_calibrate(
    path: Path = typer.Argument(..., help="BatchTopK crosscoder directory (config.json + model.safetensors)."),
    acts: list[str] = typer.Option([], "--acts", help="Calibration activations: a collect output directory, or one store directory per model in the crosscoder's model order (repeat)."),
    max_tokens: int = typer.Option(100_000, "--max-tokens", help="Calibration tokens (the first ones of the stores). Memory: about 2 x k x max_tokens floats per model."),
    k: Optional[int] = typer.Option(None, "--k", help="Target mean L0 per token of the per-source codes (default: the crosscoder's training k)."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Tokens scored at once (memory only)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the calibrated crosscoder here (default: in place, into PATH)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device (default: cuda if available)."),
    clear: bool = typer.Option(False, "--clear", help="Remove calibrated thresholds instead (encode_source uses the joint threshold again); no --acts."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of an unfinished crosscoder training run."),
) -> None:
    """Calibrate one BatchTopK inference threshold per model so per-source codes f^m have mean L0 = k (their fingerprint changes)."""
    import contextlib

    import torch

    from posttrain_probe.analysis.feature_sets import crosscoder_fingerprint
    from posttrain_probe.crosscoder.calibrate import calibrate_source_thresholds
    from posttrain_probe.crosscoder.inspect import load_crosscoder, training_status
    from posttrain_probe.crosscoder.sources import open_source
    from posttrain_probe.locks import DirectoryLock

    cc = load_crosscoder(path, allow_incomplete=allow_incomplete)
    before = crosscoder_fingerprint(cc)
    target = out if out is not None else path
    status = training_status(path)
    if out is None and status is not None and not status.get("complete", True):
        raise ProbeError(f"{path} is an unfinished training run: calibrating it in place would be overwritten when it resumes; write the calibrated copy elsewhere with --out DIR")
    # in place: the run directory is a crosscoder run's, hold its lock while config.json is rewritten
    held = DirectoryLock(Path(target), what="crosscoder run") if out is None else contextlib.nullcontext()
    if clear:
        if acts:
            raise ProbeError("--clear removes the calibrated thresholds and reads no activations: drop --acts")
        cc.config.source_thresholds = None
        with held:
            cc.save_pretrained(target)
        typer.echo(f"{target}: per-source thresholds removed (fingerprint {before[:12]} -> {crosscoder_fingerprint(cc)[:12]})")
        return
    if cc.config.activation != "batchtopk":
        raise ProbeError(f"{path} is a {cc.config.activation} crosscoder: only BatchTopK crosscoders have inference thresholds to calibrate")
    if not acts:
        raise ProbeError("give the calibration activations: --acts DIR (a collect output) or one --acts store directory per model")
    source = open_source(acts=acts, layer=cc.config.layer, model_names=cc.model_names)
    if list(source.model_names) != cc.model_names or source.d_model != cc.config.d_model:
        raise ProbeError(
            f"the activations hold models {source.model_names} of width {source.d_model}; the crosscoder expects {cc.model_names} of width {cc.config.d_model}"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cc.to(device).eval()
    batches = source.iter_batches(batch_size, shuffle=False, device=device, dtype=cc.W_enc.dtype)
    result = calibrate_source_thresholds(cc, batches, max_tokens=max_tokens, k=k, batch_size=batch_size)
    with held:
        cc.cpu().save_pretrained(target)
    after = crosscoder_fingerprint(cc)
    report = {
        "crosscoder": str(target),
        "k": result.k,
        "n_tokens": result.n_tokens,
        "joint_threshold": float(cc.threshold),
        "models": {
            name: {"threshold": theta, "l0_joint_threshold": before_l0, "l0_calibrated": after_l0}
            for name, theta, before_l0, after_l0 in zip(cc.model_names, result.thresholds, result.l0_joint_threshold, result.l0_calibrated)
        },
        "fingerprint_before": before,
        "fingerprint_after": after,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"per-source thresholds on {result.n_tokens:,} tokens (target mean L0 k = {result.k}; joint threshold {report['joint_threshold']:.4g}):")
    for name, row in report["models"].items():
        typer.echo(f"  {name}: theta {row['threshold']:.4g}; per-source L0 {row['l0_joint_threshold']:.2f} with the joint threshold -> {row['l0_calibrated']:.2f}")
    typer.echo(
        f"written to {target}; fingerprint {before[:12]} -> {after[:12]}: feature sets made for the uncalibrated crosscoder are refused "
        "for it (remake them, or keep the uncalibrated copy with --out)"
    )
