"""Load a crosscoder with a clear error and summarise it (``posttrain-probe crosscoder info``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.errors import ProbeError


def training_status(path: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``training_status.json`` (``complete``, ``step`` of the weights, ``total_steps``,
    ``tokens``, ``warnings``), or None for a crosscoder saved outside a training run."""
    from posttrain_probe.crosscoder.layout import STATUS

    file = Path(path) / STATUS
    return json.loads(file.read_text()) if file.exists() else None


def _unfinished(path: str | os.PathLike) -> str | None:
    """None for a finished run (or a crosscoder saved outside one), else what to do about it."""
    status = training_status(path)
    if status is None or status.get("complete", True):
        return None
    return (
        f"the crosscoder in {path} is from an unfinished training run (weights of step {status['step']} of "
        f"{status['total_steps']}): finish it with `posttrain-probe crosscoder train ... --out {path} --resume`, or pass --allow-incomplete"
    )


def require_complete(path: str | os.PathLike, allow_incomplete: bool = False) -> None:
    """The CLI's check before a command uses the crosscoder in ``path``: ProbeError for the weights of
    an unfinished training run unless ``allow_incomplete`` (then a warning, as :func:`load_crosscoder`)."""
    message = _unfinished(path)
    if message is not None and not allow_incomplete:
        raise ProbeError(message)


def load_crosscoder(path: str | os.PathLike, *, device: str | None = None, allow_incomplete: bool = True) -> Crosscoder:
    """``Crosscoder.from_pretrained(path)`` with a ProbeError when ``path`` holds no crosscoder.

    The weights of an interrupted training run (``training_status.json`` says not complete) load
    with a warning naming the step they are from, or, with ``allow_incomplete=False`` (the CLI's
    default), raise a ProbeError that says how to finish or accept the run.
    """
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise ProbeError(f"{path} holds no crosscoder: expected config.json and model.safetensors")
    message = _unfinished(path)
    if message is not None:
        if not allow_incomplete:
            raise ProbeError(message)
        import warnings

        warnings.warn(message.split(": finish it")[0], stacklevel=2)
    try:
        model = Crosscoder.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise ProbeError(f"cannot load the crosscoder in {path}: {err}") from err
    return model.to(device) if device else model


def as_crosscoder(
    crosscoder: Crosscoder | str | os.PathLike, *, allow_incomplete: bool = True, device: str | None = None
) -> tuple[Crosscoder, Path | None]:
    """The one "a crosscoder or its directory" reader: ``(Crosscoder, its directory or None)``.

    A directory is loaded with :func:`load_crosscoder` (``allow_incomplete`` as there); an object must
    be a :class:`Crosscoder`, else a ProbeError names what was given.
    """
    if isinstance(crosscoder, (str, os.PathLike)):
        return load_crosscoder(crosscoder, device=device, allow_incomplete=allow_incomplete), Path(crosscoder)
    if not isinstance(crosscoder, Crosscoder):
        raise ProbeError(f"expected a Crosscoder or its directory, got {type(crosscoder).__name__}")
    return (crosscoder.to(device) if device else crosscoder), None


def crosscoder_summary(path: str | os.PathLike) -> dict[str, Any]:
    """JSON-ready facts about the crosscoder in ``path`` and, if present, its training run.

    ``weights_step`` is the optimizer step the saved weights are from and ``complete`` whether the
    run finished (None outside a training run); ``steps`` is the last logged step, which can
    be later than the weights when a run was killed between checkpoints.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unfinished run is shown as such below
        cc = load_crosscoder(path)
    norms = cc.W_dec.detach().norm(dim=-1)  # [F, N]
    info: dict[str, Any] = {
        "path": str(path),
        "models": cc.model_names,
        "layer": cc.config.layer,
        "d_model": cc.config.d_model,
        "n_features": cc.config.n_features,
        "activation": cc.config.activation + (f" (k={cc.config.k})" if cc.config.activation == "batchtopk" else ""),
        "scales": [round(v, 6) for v in cc.scales.tolist()],
        "zero_decoder_features": int((norms.sum(-1) == 0).sum()),
    }
    status = training_status(path)
    if status is not None:
        info.update(
            weights_step=status["step"],
            total_steps=status["total_steps"],
            complete=status["complete"],
            warnings=status.get("warnings", []),
        )
    else:
        info.update(weights_step=None, complete=None)
    metrics = Path(path) / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().splitlines()
        if lines:
            last = json.loads(lines[-1])
            info.update(
                steps=last["step"],
                tokens=last["tokens"],
                loss=round(last["loss"], 6),
                fvu={name: round(v, 4) for name, v in zip(cc.model_names, last["fvu"])},
                l0=round(last["l0"], 2),
                dead_fraction=round(last["dead_fraction"], 4),
            )
    return info


def training_liveness(path: str | os.PathLike) -> torch.Tensor | None:
    """[F] bool: which features fired late in the crosscoder's own training run (None without a run).

    Read from the firing counters of the newest state in ``path/trainer_state/``: a feature is live
    when it fired within the trailing window of :func:`~posttrain_probe.crosscoder.config.dead_window_tokens`
    (over the tokens trained so far) - the window the trainer itself uses to call a feature dead
    (docs/methods.md sec. 3). A latent that
    fired only early in training and then died counts as dead. Liveness measured on held-out
    activations (``analyze --acts``) is the stronger evidence and takes precedence.
    """
    from safetensors.torch import load_file

    from posttrain_probe.crosscoder.config import dead_window_tokens
    from posttrain_probe.crosscoder.layout import STATE_DIR

    state_dir = Path(path) / STATE_DIR
    pointer = state_dir / "latest.json"
    if not pointer.exists():
        return None
    target = state_dir / json.loads(pointer.read_text())["dir"]
    try:  # the counters only: the weights and optimizer moments of a large run are tens of GB
        meta = json.loads((target / "state.json").read_text())
        counters = load_file(str(target / "counters.safetensors"))
    except (OSError, ValueError, KeyError) as err:
        raise ProbeError(f"cannot read the training counters in {target}: {err}") from err
    training = meta["configs"]["training"]
    tokens = int(meta["step"]) * int(training["batch_size"])
    window = dead_window_tokens(int(training["dead_after_tokens"]), int(training["batch_size"]), tokens)
    return (counters["tokens_since_fired"] < window) & counters["fired_ever"]


def crosscoder_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings that counts of model-specific latents depend on: F, activation, λ or k, tokens.

    From ``config.json`` and, when the run directory has them, ``training_config.json`` and the
    last line of ``metrics.jsonl``. Two analyses are comparable only at equal settings.
    """
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        return {}  # a label, not a run directory: the caller falls back to the crosscoder's own config
    cc_config = json.loads(config_file.read_text())
    settings: dict[str, Any] = {"n_features": cc_config.get("n_features"), "activation": cc_config.get("activation")}
    if cc_config.get("activation") == "batchtopk":
        settings["k"] = cc_config.get("k")
    training_file = Path(path) / "training_config.json"
    if training_file.exists():
        training = json.loads(training_file.read_text()).get("training", {})
        if cc_config.get("activation") != "batchtopk":
            settings["l1_coefficient"] = training.get("l1_coefficient")
        settings["batch_size"] = training.get("batch_size")
    metrics = Path(path) / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    settings["tokens_trained"] = json.loads(lines[-1])["tokens"] if lines else None
    return settings
