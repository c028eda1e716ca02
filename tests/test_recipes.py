"""The TRL recipes (recipes/sft.py, grpo.py, sft_kl.py): tiny configs end to end under `accelerate launch`,
the paper configs parse, the column mapping of real math datasets, and sft_kl's KL term in-process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from posttrain_probe.math_answers import MATH_INSTRUCTION

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _recipe(name: str):
    """Import recipes/<name>.py as a module (its sibling `common` importable, as when run as a script)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _launch(recipe: str, out: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--cpu",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "2",
        str(RECIPES / f"{recipe}.py"), "--config", str(RECIPES / "configs" / "tiny" / f"{recipe}.yaml"),
        "--output_dir", str(out),
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, paradigm", [("sft", "sft"), ("grpo", "grpo"), ("sft_kl", "sft_kl")])
def test_tiny_recipe_runs_end_to_end(recipe, paradigm, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    started = time.perf_counter()
    result = _launch(recipe, out)
    assert result.returncode == 0, f"{recipe} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert time.perf_counter() - started < 120, "the tiny config should run in well under a minute"

    manifest = json.loads((out / "probe" / "probe.json").read_text())
    assert manifest["paradigm"] == paradigm and manifest["layers"] == [2]
    assert [entry["step"] for entry in manifest["snapshots"]] == manifest["schedule"] and manifest["snapshots"]
    assert 0 in [entry["step"] for entry in manifest["activations"]]
    assert (out / "probe" / "activations" / "step-000000" / "layer2" / "manifest.json").is_file()
    last = manifest["snapshots"][-1]["path"]
    assert (out / "probe" / last / "model.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    if recipe == "sft_kl":
        assert "'kl':" in result.stdout + result.stderr  # the KL term is logged


@pytest.mark.slow
def test_sft_kl_two_processes(tmp_path):
    """DDP over gloo (torchrun, 2 CPU processes): the KL term, the base model and the probe run on every rank."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(RECIPES / "sft_kl.py"), "--config", str(RECIPES / "configs" / "tiny" / "sft_kl.yaml"), "--output_dir", str(out),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    manifest = json.loads((out / "probe" / "probe.json").read_text())
    assert manifest["world_size"] == 2 and manifest["snapshots"]
    store = json.loads((out / "probe" / "activations" / "step-000000" / "layer2" / "manifest.json").read_text())
    assert store["complete"] and store["n_tokens"] > 0 and len(store["shards"]) == 2  # one shard per rank, merged
    assert "'kl':" in result.stdout + result.stderr


def test_help_is_light_and_lists_probe_options():
    """`--help` builds the parser only: no trainer, no datasets, no math-verify imported."""
    code = textwrap.dedent(
        f"""
        import runpy, sys, time
        sys.path.insert(0, {str(RECIPES)!r})
        started = time.perf_counter()
        for name in ("sft", "grpo"):
            sys.argv = [name + ".py", "--help"]
            try:
                runpy.run_path({str(RECIPES)!r} + "/" + name + ".py", run_name="__main__")
            except SystemExit as exit:
                assert exit.code in (0, None), exit.code
        heavy = [m for m in ("trl.trainer.sft_trainer", "trl.trainer.grpo_trainer", "datasets", "math_verify") if m in sys.modules]
        print("HEAVY", heavy, "SECONDS", round(time.perf_counter() - started, 2))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for option in (
        "--probe_layers",
        "--probe_n_docs",
        "--question_column",
        "--final_answer_column",
        "--chat_template_path",
    ):
        assert option in result.stdout, option
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


@pytest.mark.parametrize("recipe", ["sft", "grpo", "sft_kl"])
def test_every_config_parses(recipe):
    """Each YAML of recipes/configs/*/ names only fields of the recipe's dataclasses (bf16 off: this is a CPU)."""
    module = _recipe(recipe)
    configs = sorted((RECIPES / "configs").glob(f"*/{recipe}.yaml"))
    assert {path.parent.name for path in configs} >= {"tiny", "qwen3-4b-base", "llama-3.1-8b"}
    for path in configs:
        script_args, training_args, model_args, probe_args, _ = module.make_parser().parse_args_and_config(
            ["--config", str(path), "--bf16", "false", "--use_cpu", "true"]
        )
        assert model_args.model_name_or_path and script_args.dataset_name and probe_args.probe_layers
        if path.parent.name != "tiny":
            assert training_args.num_train_epochs == 1
            assert script_args.instruction == MATH_INSTRUCTION, path  # the eval suites' and data prepare's prompt
            if recipe == "grpo":
                assert (training_args.beta, training_args.entropy_coef) == (0.0, 0.0)
                assert (training_args.epsilon, training_args.epsilon_high, training_args.num_generations) == (
                    0.2,
                    0.28,
                    8,
                )
                assert training_args.learning_rate == 1e-6 and training_args.max_completion_length == 16384
                # 8 GPUs: 64 prompts x 8 rollouts per optimizer step, 128 prompts per generation round
                per_step = training_args.per_device_train_batch_size * 8
                assert per_step * training_args.gradient_accumulation_steps == 64 * 8
                assert per_step * training_args.steps_per_generation == 128 * 8
            else:
                assert training_args.learning_rate == 5e-5
                assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * 8 == 128
        if recipe == "sft_kl":
            assert training_args.kl_coefficient == 0.1


def test_column_mapping_of_real_math_datasets(tmp_path):
    """OpenR1-Math-220k (lists of traces + math-verify flags) and gsm8k ('#### N') as local files."""
    common = _recipe("common")
    openr1 = tmp_path / "openr1.jsonl"
    rows = [
        {
            "problem": "1+1?",
            "answer": "2",
            "generations": ["wrong \\boxed{3}", "ok \\boxed{2}"],
            "correctness_math_verify": [False, True],
        },
        {"problem": "2+2?", "answer": "4", "generations": ["bad", "worse"], "correctness_math_verify": [False, False]},
    ]
    openr1.write_text("\n".join(json.dumps(row) for row in rows))
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(
        json.dumps({"question": "Add 600 and 634.", "answer": "600 + 634 = <<600+634=1234>>1234\n#### 1,234"})
    )

    sft = common.sft_dataset(common.MathScriptArguments(
        dataset_name=str(openr1), question_column="problem", answer_column="generations",
        correct_column="correctness_math_verify", instruction="Box it.",
    ))  # fmt: skip
    assert len(sft) == 1  # the problem without a correct trace is dropped
    assert sft[0]["prompt"] == [{"role": "user", "content": "1+1?\n\nBox it."}]
    assert sft[0]["completion"] == [{"role": "assistant", "content": "ok \\boxed{2}"}]

    grpo = common.grpo_dataset(
        common.MathScriptArguments(dataset_name=str(openr1), question_column="problem", final_answer_column="answer")
    )
    assert grpo["solution"] == ["2", "4"] and grpo[0]["prompt"][0]["content"] == "1+1?"
    grpo = common.grpo_dataset(common.MathScriptArguments(dataset_name=str(gsm8k), final_answer_column=""))
    assert grpo[0]["solution"] == "1234"
    sft = common.sft_dataset(common.MathScriptArguments(dataset_name=str(gsm8k)))
    assert sft[0]["completion"][0]["content"].endswith("#### 1,234")

    from trl.rewards import accuracy_reward

    assert accuracy_reward([[{"content": "so \\boxed{1234}"}], [{"content": "\\boxed{1233}"}]], ["1234", "1234"]) == [
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="not in the dataset"):
        common.sft_dataset(common.MathScriptArguments(dataset_name=str(gsm8k), question_column="problem"))


def test_sft_kl_term(tmp_path):
    """KL(base || current) is 0 when the model is the base (loss == SFT loss), positive once it moved, equal to the
    KL of the two models' full next-token distributions on the completion tokens, and it has a gradient."""
    from trl import SFTTrainer

    from posttrain_probe.testing import tiny_model, tiny_tokenizer

    sft_kl, common = _recipe("sft_kl"), _recipe("common")
    dataset = common.sft_dataset(common.MathScriptArguments(dataset_name="synthetic:arithmetic", max_samples=8))
    args = sft_kl.SFTKLConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
        max_length=96, kl_coefficient=0.5, gradient_checkpointing=False, dataloader_num_workers=0,
    )  # fmt: skip
    model, base = tiny_model("qwen3"), tiny_model("qwen3")
    trainer = sft_kl.SFTKLTrainer(
        model=model, base_model=base, args=args, train_dataset=dataset, processing_class=tiny_tokenizer()
    )
    assert not any(p.requires_grad for p in trainer.base_model.parameters())
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = inputs["labels"]
    assert (labels != -100).sum() < inputs["attention_mask"].sum()  # completion tokens only
    model.train()

    def losses():
        with_kl = trainer.compute_loss(model, dict(inputs))
        kl = trainer._metrics["train"]["kl"][-1]
        plain = SFTTrainer.compute_loss(trainer, model, dict(inputs))
        return with_kl, plain, kl

    with_kl, plain, kl = losses()
    assert kl == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(with_kl, plain)

    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    with_kl, plain, kl = losses()
    assert kl > 1e-3
    torch.testing.assert_close(with_kl - plain, torch.tensor(0.5 * kl), rtol=1e-4, atol=1e-6)

    with torch.no_grad():  # reference: the full next-token distributions of both models
        log_p = (
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1].log_softmax(-1)
        )
        log_q = (
            base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1].log_softmax(-1)
        )
        mask = labels[:, 1:] != -100
        reference = (log_q.exp() * (log_q - log_p)).sum(-1)[mask].mean()
    assert kl == pytest.approx(reference.item(), rel=1e-4)

    model.zero_grad()
    (with_kl - plain).backward()  # the KL term alone reaches the weights
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())


def test_sft_kl_peft_base_is_the_policy_without_adapter(tmp_path):
    """With a LoRA policy and no base_model, the base distribution is the policy's with the adapter disabled."""
    from peft import LoraConfig

    from posttrain_probe.testing import tiny_model, tiny_tokenizer

    sft_kl, common = _recipe("sft_kl"), _recipe("common")
    dataset = common.sft_dataset(common.MathScriptArguments(dataset_name="synthetic:arithmetic", max_samples=8))
    args = sft_kl.SFTKLConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
        max_length=96, gradient_checkpointing=False,
    )  # fmt: skip
    peft_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    trainer = sft_kl.SFTKLTrainer(
        model=tiny_model("qwen3"),
        args=args,
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
    )
    assert trainer.base_model is None
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(inputs))
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    assert trainer._metrics["train"]["kl"][-1] > 1e-4
    loss.backward()
    assert all(param.grad is None for name, param in trainer.model.named_parameters() if "lora" not in name)


def test_gpu_grpo_configs_generate_with_vllm_colocate_and_tiny_ones_with_hf():
    """The paper GRPO configs compose into a GRPOConfig that generates with TRL's vLLM engine colocated with
    training; the tiny config generates with HF generate (the CPU fallback the end-to-end test runs)."""
    module = _recipe("grpo")
    for path in sorted((RECIPES / "configs").glob("*/grpo.yaml")):
        _, training_args, _, _, _ = module.make_parser().parse_args_and_config(
            ["--config", str(path), "--bf16", "false", "--use_cpu", "true"]
        )
        if path.parent.name == "tiny":
            assert not training_args.use_vllm, path
        else:
            assert (training_args.use_vllm, training_args.vllm_mode) == (True, "colocate"), path
            assert 0 < training_args.vllm_gpu_memory_utilization <= 0.5, path


@pytest.mark.parametrize(
    ("vllm_installed", "gpu", "missing"),
    [(False, False, "the vllm package and a CUDA GPU"), (True, False, "a CUDA GPU"), (False, True, "the vllm package")],
)
def test_vllm_generation_preflight_names_what_is_missing(vllm_installed, gpu, missing):
    from posttrain_probe.recipes.common import check_vllm_generation

    class Args:
        use_vllm, vllm_mode = True, "colocate"

    with pytest.raises(ValueError, match=f"needs {missing} ") as err:
        check_vllm_generation(Args(), vllm_installed=vllm_installed, gpu=gpu)
    assert "\n" not in str(err.value)
    check_vllm_generation(Args(), vllm_installed=True, gpu=True)
    Args.use_vllm = False
    check_vllm_generation(Args(), vllm_installed=False, gpu=False)


def test_grpo_cli_with_vllm_on_a_cpu_is_a_one_line_error(tmp_path):
    """`use_vllm: true` where vLLM cannot run stops before any model or dataset is loaded, with exit 2."""
    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM can run here")
    result = subprocess.run(
        [sys.executable, "-m", "posttrain_probe.recipes.grpo", "--config", str(RECIPES / "configs" / "tiny" / "grpo.yaml"),
         "--use_vllm", "true", "--output_dir", str(tmp_path / "out")],
        cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: use_vllm=true (vllm_mode=")
    assert not (tmp_path / "out").exists()
