"""Model identity: fingerprints in stores and crosscoders, and the check that refuses another model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain_probe import ProbeError
from posttrain_probe.activations import CollectConfig, PairedActivations
from posttrain_probe.activations.collect import collect
from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig
from posttrain_probe.crosscoder.train import CrosscoderTrainingConfig, train_crosscoder
from posttrain_probe.interventions.blocking import GradientBlocker
from posttrain_probe.interventions.features import FeatureIntervention
from posttrain_probe.model_identity import check_model, mismatch, model_fingerprint, slot_fingerprint
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer, tuned_copy

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 2


def test_fingerprint_stable_across_save_load_and_dtype(tmp_path):
    model = tiny_model("qwen3", seed=0)
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    bf16 = tiny_model("qwen3", seed=0, dtype=torch.bfloat16)
    first = model_fingerprint(model)
    assert first == model_fingerprint(reloaded) == model_fingerprint(bf16)
    assert (
        first["model_type"] == "qwen3"
        and first["hidden_size"] == 64
        and first["vocab_size"] == 512
        and first["weights_sha256"]
    )
    json.dumps(first)  # goes into manifest.json / config.json as it is


def test_fingerprint_differs_for_other_architecture_and_seed_but_not_for_a_tuned_copy():
    base = model_fingerprint(tiny_model("qwen3", seed=0))
    llama = model_fingerprint(tiny_model("llama", seed=0))
    other_seed = model_fingerprint(tiny_model("qwen3", seed=1))
    assert llama != base and mismatch(llama, base) == ["architecture", "model_type"]
    assert other_seed["weights_sha256"] != base["weights_sha256"] and mismatch(other_seed, base) == ["weights"]
    tuned = model_fingerprint(tuned_copy(tiny_model("qwen3", seed=0), tiny_tokenizer(), steps=3))
    assert tuned["weights_sha256"] != base["weights_sha256"] and mismatch(tuned, base) == []  # same lineage


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stores collected from a tiny qwen3 base + seed-1 'other' model, and a crosscoder trained on them."""
    root = tmp_path_factory.mktemp("identity")
    models = {"base": tiny_model("qwen3", seed=0), "other": tiny_model("qwen3", seed=1)}
    collect(
        CollectConfig(
            model=[], dataset="arithmetic", out=root / "acts", layer=[LAYER], seq_len=32, batch_size=16, max_tokens=None
        ),
        models=models,
        dataset=arithmetic_dataset(32, seed=3),
        tokenizer=tiny_tokenizer(),
        progress=False,
    )
    config = CrosscoderTrainingConfig(
        n_tokens=512, batch_size=128, log_every=2, checkpoint_every=4, mixed_precision="no", scale_tokens=512
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a few steps: far from converged, on purpose
        train_crosscoder(
            PairedActivations.from_directory(root / "acts"),
            CrosscoderConfig(n_features=32),
            config,
            root / "cc",
            progress=False,
        )
    return root, models


def test_collected_store_and_crosscoder_record_the_model(trained):
    root, models = trained
    for name, model in models.items():
        manifest = json.loads((root / "acts" / name / f"layer{LAYER}" / "manifest.json").read_text())
        assert manifest["model"]["fingerprint"] == model_fingerprint(model)
    cc = Crosscoder.from_pretrained(root / "cc")
    assert cc.config.model_fingerprints == [model_fingerprint(models["base"]), model_fingerprint(models["other"])]
    assert slot_fingerprint(cc, 1) == model_fingerprint(models["other"])


def test_intervention_and_blocker_refuse_another_model(trained):
    root, models = trained
    cc = Crosscoder.from_pretrained(root / "cc")
    llama = tiny_model("llama", seed=0)
    for wrong, what, why in [
        (llama, r"llama \(LlamaForCausalLM", "differs in architecture, model_type"),
        (models["other"], r"qwen3 \(Qwen3", "weights differ"),
    ]:
        with pytest.raises(
            ProbeError,
            match=rf"is {what}.*but crosscoder slot 'base' was trained on qwen3.*{why}.*allow_model_mismatch=True / --allow-model-mismatch",
        ) as err:
            FeatureIntervention(cc, [0, 1], model_name="base").attach(wrong)
        assert "\n" not in str(err.value)
        with pytest.raises(ProbeError, match="crosscoder slot 'base' was trained on qwen3"):
            GradientBlocker(cc, [0, 1], model="base").attach(wrong)
        assert (
            not hasattr(wrong, "_posttrain_probe_feature_hooks")
            and getattr(wrong, "_posttrain_probe_blocker", None) is None
        )

    iv = FeatureIntervention(cc, [0, 1], model_name="base", allow_model_mismatch=True).attach(llama)
    assert iv.is_attached and "differs in architecture" in iv.model_mismatch
    iv.detach()
    blocker = GradientBlocker(cc, [0, 1], model="base", allow_model_mismatch=True).attach(llama)
    assert blocker.is_attached and "differs in architecture" in blocker.model_mismatch
    blocker.detach()

    for name, model in models.items():  # the right models, and a bf16 copy of one
        with FeatureIntervention(cc, [0], model_name=name).attach(model) as iv:
            assert iv.model_mismatch is None
        GradientBlocker(cc, [0], model=name).attach(model).detach()
    FeatureIntervention(cc, [0], model_name="base").attach(tiny_model("qwen3", seed=0, dtype=torch.bfloat16)).detach()


def test_crosscoder_without_fingerprints_is_not_checked(trained, tmp_path):
    root, _ = trained
    config = json.loads((root / "cc" / "config.json").read_text())
    config.pop("model_fingerprints")  # as written before fingerprints existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(root / "cc" / "model.safetensors")
    old = Crosscoder.from_pretrained(tmp_path)
    assert old.config.model_fingerprints is None and slot_fingerprint(old, 0) is None
    llama = tiny_model("llama", seed=0)
    FeatureIntervention(old, [0], model_name="base").attach(llama).detach()
    GradientBlocker(old, [0], model="base").attach(llama).detach()
    raw = Crosscoder(CrosscoderConfig(model_names=["a"], d_model=64, n_features=8, layer=LAYER))  # from raw tensors
    assert check_model(llama, slot_fingerprint(raw, 0), "a") is None


def test_probe_hf_and_model_paths_are_checked(trained, tmp_path):
    pytest.importorskip("lm_eval")
    from posttrain_probe.eval.runner import load_probe_lm
    from posttrain_probe.model_identity import check_model_path

    root, models = trained
    dirs = {}
    for name, model in [("llama", tiny_model("llama", seed=0)), ("base", models["base"])]:
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    args = {"crosscoder": str(root / "cc"), "features": "0;1", "model_name": "base"}
    with pytest.raises(
        ProbeError, match=rf"the model at {dirs['llama']} is llama .*crosscoder slot 'base' was trained on qwen3"
    ):
        load_probe_lm({"pretrained": str(dirs["llama"]), **args})
    lm = load_probe_lm({"pretrained": str(dirs["llama"]), **args, "allow_model_mismatch": True})
    assert "differs in architecture" in lm.intervention.model_mismatch
    assert load_probe_lm({"pretrained": str(dirs["base"]), **args}).intervention.model_mismatch is None
    recorded = slot_fingerprint(Crosscoder.from_pretrained(root / "cc"), 0)
    with pytest.raises(ProbeError, match="allow_model_mismatch"):
        check_model_path(dirs["llama"], recorded, "base")
    assert check_model_path(dirs["base"], recorded, "base") is None


def test_sharded_embedding_checks_the_config_only():
    """Under ZeRO-3 / FSDP a rank holds no whole embedding: the weights are left out, the config still counts."""
    base = model_fingerprint(tiny_model("qwen3", seed=0))
    for arch, expected in [("qwen3", []), ("llama", ["architecture", "model_type"])]:
        sharded = tiny_model(arch, seed=1)
        sharded.get_input_embeddings().weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves on a rank
        fingerprint = model_fingerprint(sharded)
        assert fingerprint["weights"] is None and fingerprint["weights_sha256"] is None
        assert mismatch(fingerprint, base) == expected
