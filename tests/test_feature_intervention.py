"""Feature interventions (docs/methods.md sec. 7): FeatureIntervention, max_activations, crosscoder fingerprints.

References are computed independently of ``posttrain_probe.interventions.features``: codes come
from the crosscoder's public ``encode_source`` over all F features, the decoded change from the
full ``W_dec`` (f' - f is zero outside S), and "what the model sees" is captured by a plain
pre-hook on block L (registered after the intervention's, so it runs after the edit).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from posttrain_probe.analysis.feature_sets import (
    crosscoder_fingerprint,
    load_feature_set,
    resolve_features,
    write_feature_set,
)
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.data import TokenBatch
from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions import POSITIONS, FeatureIntervention, ReferenceReading, max_activations
from posttrain_probe.layers import decoder_blocks, truncated_forward
from posttrain_probe.models import load_causal_lm
from posttrain_probe.testing import tiny_model, tiny_tokenizer

LAYER = 2
D = 64
N_FEATURES = 48
S = [1, 4, 9, 17, 30, 47]
PROMPTS = ["The quick brown fox jumps over", "Let us think", "A small model learns to add numbers"]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_crosscoder(
    *, seed=0, activation="relu", names=("base", "rl"), layer=LAYER, d=D, n_features=N_FEATURES
) -> Crosscoder:
    """Random untied weights, non-trivial scales, b_enc so that a good share of the codes fire."""
    cc = Crosscoder(
        CrosscoderConfig(
            model_names=list(names), d_model=d, n_features=n_features, layer=layer, activation=activation, k=4
        )
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(cc.W_enc.shape, generator=gen) / d**0.5)
        cc.W_dec.copy_(torch.randn(cc.W_dec.shape, generator=gen) * 0.2)
        cc.b_enc.copy_(torch.randn(n_features, generator=gen) * 0.5)
        cc.b_dec.copy_(torch.randn(cc.b_dec.shape, generator=gen))  # must play no part
        cc.scales.copy_(torch.tensor([0.37, 1.9, 0.8][: len(names)]))
    return cc


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3", seed=0)


@pytest.fixture(scope="module")
def cc():
    return random_crosscoder()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def encode(tokenizer, texts, side):
    tokenizer.padding_side = side
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    # positions from the mask (what generate() does), so the model itself is padding-invariant
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}


def reference_edit(cc, model_name, features, a, mode, value=None, max_acts=None):
    """a + W_dec^m (f' - f) / s_m from the full crosscoder (docs/methods.md sec. 7); a is [n, d]."""
    slot = cc.model_index(model_name)
    with torch.no_grad():
        f = cc.encode_source(a, model_name)
        new = f.clone()
        if mode == "zero":
            new[:, features] = 0
        elif mode == "set":
            new[:, features] = value
        elif mode == "scale":
            new[:, features] = value * f[:, features]
        elif mode == "add":
            new[:, features] = f[:, features] + value
        else:
            new[:, features] = value * max_acts[features]
        return a + (new - f) @ cc.W_dec[:, slot] / cc.scales[slot]


class BlockInput:
    """Records the input of block ``layer`` as the block sees it (after earlier pre-hooks)."""

    def __init__(self, model, layer=LAYER):
        self.seen = []
        self.handle = decoder_blocks(model)[layer].register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def close(self):
        self.handle.remove()


def block_input(model, inputs, layer=LAYER):
    recorder = BlockInput(model, layer)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        recorder.close()
    return recorder.seen[0], logits


@torch.no_grad()
def replaced_logits(model, inputs, new_input, layer=LAYER):
    """Logits when the input of block ``layer`` is replaced by ``new_input`` (a manual hook)."""

    def hook(module, args, kwargs):
        if args:
            return (new_input, *args[1:]), kwargs
        kwargs["hidden_states"] = new_input
        return args, kwargs

    handle = decoder_blocks(model)[layer].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        return model(**inputs).logits
    finally:
        handle.remove()


def hook_counts(model):
    return (
        len(model._forward_pre_hooks),
        len(model._forward_hooks),
        [len(b._forward_pre_hooks) for b in decoder_blocks(model)],
    )


# ---------------------------------------------------------------------------------------------
# the operation
# ---------------------------------------------------------------------------------------------


def worked_example(scale: float) -> Crosscoder:
    """docs/methods.md sec. 7 worked value: d = 2, feature 0 with decoder d_0 = [1, 2] (raw units), encoder
    reading f_0 = 1 at a = [2, 4]; feature 1 is active too but not chosen.

    In normalised units W_dec[0] = s * [1, 2] and W_enc[:, 0] = [0.25, 0.125] / s, so raw
    f_0(a) = relu(s a . W_enc[:, 0]) = 0.5 + 0.5 = 1 and the raw decoded direction is [1, 2].
    set v = 3: a' = a + (3 - 1) [1, 2] = [2, 4] + [2, 4] = [4, 8]. zero: a' = a - [1, 2] = [1, 2].
    All numbers are powers of two: exact in float32.
    """
    cc = Crosscoder(CrosscoderConfig(model_names=["rl"], d_model=2, n_features=2, layer=0))
    with torch.no_grad():
        cc.scales.fill_(scale)
        cc.W_dec.copy_(torch.tensor([[[1.0, 2.0]], [[-4.0, 1.0]]]) * scale)
        cc.W_enc.copy_(torch.tensor([[[0.25, 0.5], [0.125, 0.5]]]) / scale)
        cc.b_enc.zero_()
        cc.b_dec.fill_(7.0)
    return cc


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_spec_worked_value(scale):
    cc = worked_example(scale)
    a = torch.tensor([[2.0, 4.0]])
    assert cc.encode_source(a, "rl").tolist() == [[1.0, 3.0]]
    iv = FeatureIntervention(cc, [0], mode="set")  # value 3.0 by default, one-model crosscoder: branch 0
    assert iv.value == 3.0 and iv.model_name == "rl" and iv.layer == 0
    assert iv.edit(a).tolist() == [[4.0, 8.0]]
    assert FeatureIntervention(cc, [0], mode="zero").edit(a).tolist() == [[1.0, 2.0]]
    assert FeatureIntervention(cc, [0], mode="scale", value=0.5).edit(a).tolist() == [[1.5, 3.0]]
    assert FeatureIntervention(cc, [0], mode="add", value=1.0).edit(a).tolist() == [[3.0, 6.0]]
    steer = FeatureIntervention(cc, [0], mode="steer", max_acts=torch.tensor([1.5, 9.0]))  # 2 x 1.5 = 3
    assert steer.edit(a).tolist() == [[4.0, 8.0]]
    # the mask picks the rows that are edited; the others are returned as they are
    both = torch.tensor([[2.0, 4.0], [2.0, 4.0]])
    assert iv.edit(both, torch.tensor([False, True])).tolist() == [[2.0, 4.0], [4.0, 8.0]]


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_identity_interventions_leave_logits_unchanged(arch, cc, tokenizer):
    model = tiny_model(arch, seed=3) if arch != "qwen3" else tiny_model("qwen3", seed=0)
    inputs = encode(tokenizer, PROMPTS, "right")
    if arch == "gpt2":
        inputs.pop("position_ids")
    with torch.no_grad():
        baseline = model(**inputs).logits
    for mode, value in [("scale", 1.0), ("add", 0.0)]:
        for positions in POSITIONS:
            with FeatureIntervention(cc, S, mode=mode, value=value, model_name="rl", positions=positions).attach(model):
                with torch.no_grad():
                    logits = model(**inputs).logits
            torch.testing.assert_close(logits, baseline, rtol=0, atol=0)
    # a non-identity edit does change them (the comparison above is not vacuous)
    with FeatureIntervention(cc, S, mode="set", model_name="rl").attach(model):
        with torch.no_grad():
            assert not torch.allclose(model(**inputs).logits, baseline, atol=1e-3)


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
@pytest.mark.parametrize("mode, value", [("zero", None), ("set", 3.0), ("scale", -0.5), ("add", 0.75), ("steer", 2.0)])
def test_delta_is_the_decoded_change_of_the_chosen_features(model, tokenizer, mode, value, activation):
    cc = random_crosscoder(seed=1, activation=activation)
    inputs = encode(tokenizer, PROMPTS, "right")
    real = inputs["attention_mask"].bool()
    original, _ = block_input(model, inputs)
    if activation == "batchtopk":
        # a threshold that some of the chosen features' codes pass and others do not: it acts on
        # f_i * sum over ALL models of ||d_i^m||, not on branch m's decoder norm alone
        relu_codes = torch.relu((original[real] * cc.scales[1]) @ cc.W_enc[1] + cc.b_enc).detach()
        score = (relu_codes * cc.decoder_norm_sum().detach())[:, S]
        with torch.no_grad():
            cc.threshold.fill_(float(score[score > 0].median()))
        codes = cc.encode_source(original[real], "rl").detach()[:, S]
        assert 0 < int((codes > 0).sum()) < int((relu_codes[:, S] > 0).sum())
    max_acts = torch.rand(N_FEATURES, generator=torch.Generator().manual_seed(5)) * 4
    iv = FeatureIntervention(
        cc, S, mode=mode, value=value, model_name="rl", max_acts=max_acts if mode == "steer" else None
    )
    with iv.attach(model):
        edited, logits = block_input(model, inputs)
    expected = reference_edit(cc, "rl", S, original[real], mode, iv.value, max_acts)
    torch.testing.assert_close(edited[real], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(edited[~real], original[~real])  # padding is not edited
    assert (edited[real] - original[real]).abs().amax() > 1e-3  # the edit did something
    # the change is in the span of the chosen features' decoder rows (raw units)
    directions = (cc.W_dec[S, 1] / cc.scales[1]).detach()
    coefficients = torch.linalg.lstsq(directions.T, (edited - original)[real].T).solution
    torch.testing.assert_close(coefficients.T @ directions, (edited - original)[real], rtol=1e-4, atol=1e-5)
    # ... and the logits are those of the model whose block-L input is the reference a'
    full = original.clone()
    full[real] = expected
    torch.testing.assert_close(logits, replaced_logits(model, inputs, full), rtol=1e-5, atol=1e-5)


def test_edit_in_half_precision(cc, tokenizer):
    """Weights are cast once per dtype/device; the edit happens in the activations' dtype."""
    half = tiny_model("qwen3", seed=0, dtype=torch.bfloat16)
    inputs = encode(tokenizer, PROMPTS[:1], "right")
    original, _ = block_input(half, inputs)
    iv = FeatureIntervention(cc, S, mode="set", model_name="rl")
    with iv.attach(half):
        edited, logits = block_input(half, inputs)
    assert edited.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    assert set(iv._cache) == {(torch.device("cpu"), torch.bfloat16)}
    expected = reference_edit(cc, "rl", S, original[0].float(), "set", 3.0)
    torch.testing.assert_close(edited[0].float(), expected, rtol=0.05, atol=0.1)


# ---------------------------------------------------------------------------------------------
# positions, padding, generate
# ---------------------------------------------------------------------------------------------


def expected_positions(mask, positions, lengths=None):
    """[B, T] bool: the positions docs/methods.md sec. 7 edits, by hand from the attention mask."""
    rank = mask.cumsum(-1) - 1
    real = mask.bool()
    if positions == "all":
        return real
    n = mask.sum(-1) if lengths is None else torch.as_tensor(lengths)
    chosen = rank < n[:, None] if positions == "prompt" else rank == (n - 1)[:, None]
    return real & chosen


@pytest.mark.parametrize("side", ["left", "right", "right, no mask"])
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("lengths", [None, [3, 2, 5]])
def test_edited_positions(model, cc, tokenizer, side, positions, lengths):
    """Edited = real tokens (all), the prompt (prompt) or its last token (last_prompt); the prompt
    is the whole input or, with prompt_lengths, row b's first lengths[b] real tokens. Without an
    attention mask (lm-eval's loglikelihood calls) every position counts as real."""
    inputs = encode(tokenizer, PROMPTS, side.split(",")[0])
    if side == "right, no mask":
        inputs = {"input_ids": inputs["input_ids"]}
    original, _ = block_input(model, inputs)
    iv = FeatureIntervention(cc, S, mode="set", value=5.0, model_name="rl", positions=positions)
    with iv.attach(model):
        if lengths is None:
            edited, _ = block_input(model, inputs)
        else:
            with iv.prompt_lengths(lengths):
                edited, _ = block_input(model, inputs)
    changed = (edited != original).any(-1)
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    assert torch.equal(changed, expected_positions(mask, positions, lengths))


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("lengths", [None, [4, 2, 3]])
def test_padding_side_invariance(model, cc, tokenizer, positions, lengths):
    iv = FeatureIntervention(cc, S, mode="set", model_name="rl", positions=positions)
    per_side = {}
    with iv.attach(model), torch.no_grad():
        for side in ("left", "right"):
            inputs = encode(tokenizer, PROMPTS, side)
            with iv.prompt_lengths(lengths) if lengths is not None else contextlib.nullcontext():
                logits = model(**inputs).logits
            real = inputs["attention_mask"].bool()
            per_side[side] = [logits[row][real[row]] for row in range(len(PROMPTS))]
        # each row alone, unpadded
        alone = []
        for row, text in enumerate(PROMPTS):
            single = encode(tokenizer, [text], "right")
            with iv.prompt_lengths(lengths[row : row + 1]) if lengths is not None else contextlib.nullcontext():
                alone.append(model(**single).logits[0])
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(per_side["left"][row], per_side["right"][row], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(per_side["left"][row], alone[row], rtol=1e-4, atol=1e-4)
    assert not iv.is_attached


def test_generate_with_kv_cache_equals_full_recomputation(model, cc, tokenizer):
    """Greedy generate (KV cache) == step-by-step recomputation of the whole sequence without cache,
    where only the prompt positions are edited for prompt/last_prompt (generated ones too for all)."""
    new_tokens = 4
    inputs = encode(tokenizer, PROMPTS[:2], "left")
    prompt_len = inputs["attention_mask"].sum(-1)
    gen_args = dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    outputs = {}
    with torch.no_grad():
        plain = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **gen_args)
        for positions in POSITIONS:
            iv = FeatureIntervention(cc, S, mode="set", value=4.0, model_name="rl", positions=positions)
            with iv.attach(model):
                out = outputs[positions] = model.generate(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **gen_args
                )
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                for step in range(new_tokens):
                    full = {
                        "input_ids": ids,
                        "attention_mask": mask,
                        "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
                        "use_cache": False,
                    }
                    with iv.prompt_lengths(prompt_len) if positions != "all" else contextlib.nullcontext():
                        logits = model(**full).logits[:, -1]
                    torch.testing.assert_close(out.logits[step], logits, rtol=1e-4, atol=1e-4)
                    ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            assert torch.equal(out.sequences, ids)
            assert not torch.allclose(out.logits[0], plain.logits[0], atol=1e-3)  # the intervention acted
    # the prefill is the prompt for all three; decode steps are edited for `all` only
    torch.testing.assert_close(outputs["all"].logits[0], outputs["prompt"].logits[0], rtol=0, atol=0)
    assert not torch.allclose(outputs["all"].logits[-1], outputs["prompt"].logits[-1], atol=1e-3)


def test_several_interventions_compose_in_attach_order(model, cc, tokenizer):
    inputs = encode(tokenizer, PROMPTS, "right")
    inputs = {k: v[:, :5] for k, v in inputs.items()}  # no padding in the first 5 tokens
    assert bool(inputs["attention_mask"].all())
    first = FeatureIntervention(cc, S, mode="set", value=3.0, model_name="rl")
    second = FeatureIntervention(cc, S[:3], mode="scale", value=2.0, model_name="rl")
    other_branch = FeatureIntervention(cc, [0, 2, 5], mode="zero", model_name="base")
    earlier = random_crosscoder(seed=4, layer=1)
    early = FeatureIntervention(earlier, [3, 8], mode="add", value=1.5, model_name="base")

    def manual(layer_edits):
        handles = []
        for layer, edits in layer_edits.items():

            def hook(module, args, kwargs, edits=edits):
                hidden = args[0] if args else kwargs["hidden_states"]
                for iv in edits:
                    hidden = iv.edit(hidden)
                if args:
                    return (hidden, *args[1:]), kwargs
                kwargs["hidden_states"] = hidden
                return args, kwargs

            handles.append(decoder_blocks(model)[layer].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                return model(**inputs).logits
        finally:
            for handle in handles:
                handle.remove()

    with torch.no_grad():
        baseline = model(**inputs).logits
    in_order = manual({LAYER: [first, second, other_branch], 1: [early]})
    reordered = manual({LAYER: [second, first, other_branch], 1: [early]})
    without_first = manual({LAYER: [second, other_branch], 1: [early]})
    assert not torch.allclose(in_order, reordered, atol=1e-4)  # the order matters
    before = hook_counts(model)
    for iv in (first, second, other_branch, early):
        iv.attach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, in_order, rtol=1e-5, atol=1e-5)
    first.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, without_first, rtol=1e-5, atol=1e-5)
    for iv in (second, other_branch, early):
        iv.detach()
    first.detach()  # detaching twice is a no-op
    assert hook_counts(model) == before and not hasattr(model, "_posttrain_probe_feature_hooks")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, baseline)  # bit-exact after detach


def test_context_manager_detaches_on_error(model, cc, tokenizer):
    inputs = encode(tokenizer, PROMPTS[:1], "right")
    with torch.no_grad():
        baseline = model(**inputs).logits
    before = hook_counts(model)
    iv = FeatureIntervention(cc, S, mode="zero", model_name="rl")
    with pytest.raises(RuntimeError, match="boom"):
        with iv.attach(model):
            assert iv.is_attached
            raise RuntimeError("boom")
    assert not iv.is_attached and hook_counts(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, baseline)
    iv.attach(model)
    with pytest.raises(ProbeError, match="already attached"):
        iv.attach(model)
    iv.detach()


# ---------------------------------------------------------------------------------------------
# max activations (steer)
# ---------------------------------------------------------------------------------------------


def test_max_activations_and_its_cache(model, cc, tokenizer, tmp_path):
    texts = PROMPTS + ["Which of these is true? Please choose one option"]
    cc.save_pretrained(tmp_path / "cc")
    got = max_activations(
        tmp_path / "cc", "rl", model, texts, tokenizer=tokenizer, reading=ReferenceReading(batch_size=3, seq_len=16)
    )
    # reference: every kept token (real, not the first position, not BOS) of every document
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=16)
    acts = truncated_forward(model, batch["input_ids"], batch["attention_mask"], [LAYER])[LAYER]
    keep = (
        batch["attention_mask"].bool()
        & (batch["attention_mask"].cumsum(-1) > 1)
        & (batch["input_ids"] != tokenizer.bos_token_id)
    )
    expected = cc.encode_source(acts[keep], "rl").detach().amax(0)
    assert got.shape == (N_FEATURES,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got > 0).sum() > N_FEATURES // 4
    files = sorted((tmp_path / "cc" / "max_activations").glob("*.safetensors"))
    assert len(files) == 1
    assert torch.equal(
        max_activations(
            tmp_path / "cc", "rl", model, texts, tokenizer=tokenizer, reading=ReferenceReading(batch_size=3, seq_len=16)
        ),
        got,
    )
    # other model, other branch, other data: other cache entries
    other = tiny_model("qwen3", seed=7)
    max_activations(
        tmp_path / "cc", "rl", other, texts, tokenizer=tokenizer, reading=ReferenceReading(batch_size=3, seq_len=16)
    )
    max_activations(
        tmp_path / "cc", "base", model, texts, tokenizer=tokenizer, reading=ReferenceReading(batch_size=3, seq_len=16)
    )
    as_batches = [TokenBatch(batch["input_ids"], batch["attention_mask"], torch.arange(len(texts)))]
    torch.testing.assert_close(
        max_activations(tmp_path / "cc", "rl", model, as_batches), expected, rtol=1e-5, atol=1e-6
    )
    assert len(list((tmp_path / "cc" / "max_activations").glob("*.safetensors"))) == 4
    # a model given by path (loaded up to block L) and the same model loaded in full share an entry
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    from_path = max_activations(
        tmp_path / "cc", "rl", tmp_path / "model", texts, reading=ReferenceReading(batch_size=3, seq_len=16)
    )
    torch.testing.assert_close(from_path, got, rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "cc" / "max_activations").glob("*.safetensors"))) == 5
    loaded = load_causal_lm(tmp_path / "model", device="cpu")
    assert torch.equal(
        max_activations(
            tmp_path / "cc",
            "rl",
            loaded,
            texts,
            tokenizer=tokenizer,
            reading=ReferenceReading(batch_size=3, seq_len=16),
        ),
        from_path,
    )
    assert len(list((tmp_path / "cc" / "max_activations").glob("*.safetensors"))) == 5
    # an in-memory crosscoder is not cached unless cache_dir is given
    torch.testing.assert_close(
        max_activations(
            cc, "rl", model, [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}]
        ),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )
    assert len(list((tmp_path / "cc" / "max_activations").glob("*.safetensors"))) == 5

    # steer sets the chosen codes to 2 x their max activation
    inputs = encode(tokenizer, PROMPTS[:2], "right")
    real = inputs["attention_mask"].bool()
    original, _ = block_input(model, inputs)
    iv = FeatureIntervention(tmp_path / "cc", S, mode="steer", model_name="rl", max_acts=got)
    assert iv.value == 2.0 and iv.crosscoder_path == tmp_path / "cc"
    with iv.attach(model):
        edited, _ = block_input(model, inputs)
    torch.testing.assert_close(
        edited[real], reference_edit(cc, "rl", S, original[real], "steer", 2.0, got), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ProbeError, match="no tokens"):
        max_activations(cc, "rl", model, [torch.tensor([[7, 1]])])  # first position, then BOS


# ---------------------------------------------------------------------------------------------
# feature sets made for a crosscoder
# ---------------------------------------------------------------------------------------------


def test_crosscoder_fingerprint_and_feature_sets(tmp_path):
    cc = random_crosscoder(seed=0)
    fingerprint = crosscoder_fingerprint(cc)
    assert len(fingerprint) == 64 and crosscoder_fingerprint(cc) == fingerprint
    cc.save_pretrained(tmp_path / "cc")
    assert crosscoder_fingerprint(Crosscoder.from_pretrained(str(tmp_path / "cc"))) == fingerprint
    assert crosscoder_fingerprint(random_crosscoder(seed=0)) == fingerprint
    changed = random_crosscoder(seed=0)
    with torch.no_grad():
        changed.W_dec[N_FEATURES - 1, 1, D - 1] += 1e-3  # one decoder entry, in place: the cache notices
    assert crosscoder_fingerprint(changed) != fingerprint

    by_object = write_feature_set(tmp_path / "a.json", [4, 1], crosscoder=cc, crosscoder_path="runs/cc", tasks=["x"])
    by_path = write_feature_set(tmp_path / "b.json", [4, 1], crosscoder=tmp_path / "cc")
    label_only = write_feature_set(tmp_path / "c.json", [4, 1], crosscoder="elsewhere/cc")
    assert load_feature_set(by_object) == ([1, 4], "runs/cc", fingerprint, {"tasks": ["x"]})
    assert load_feature_set(by_path) == ([1, 4], str(tmp_path / "cc"), fingerprint, {})
    assert load_feature_set(label_only) == ([1, 4], "elsewhere/cc", None, {})
    for path in (by_object, by_path, label_only):
        assert resolve_features(cc, path) == [1, 4]
        assert FeatureIntervention(tmp_path / "cc", path, mode="zero", model_name="base").features == [1, 4]
    other = random_crosscoder(seed=9)
    with pytest.raises(
        ProbeError,
        match=rf"made for crosscoder 'runs/cc' \(fingerprint {fingerprint[:12]}\).*fingerprint {crosscoder_fingerprint(other)[:12]}",
    ):
        resolve_features(other, by_object)
    with pytest.raises(ProbeError, match="made for crosscoder"):
        FeatureIntervention(other, str(by_path), model_name="rl")
    assert resolve_features(other, label_only) == [1, 4]  # no fingerprint recorded: accepted as before
    assert json.loads(by_path.read_text())["format_version"] == 1


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input(model, cc, tokenizer):
    with pytest.raises(ProbeError, match=r"'ablate'.*zero, set, scale, add, steer"):
        FeatureIntervention(cc, S, mode="ablate", model_name="rl")
    with pytest.raises(ProbeError, match=r"'generated'.*all, prompt, last_prompt"):
        FeatureIntervention(cc, S, positions="generated", model_name="rl")
    with pytest.raises(ProbeError, match=rf"\[{N_FEATURES}\].*out of range.*{N_FEATURES} features"):
        FeatureIntervention(cc, [0, N_FEATURES], model_name="rl")
    with pytest.raises(ProbeError, match="out of range"):
        FeatureIntervention(cc, "-1,2", model_name="rl")
    for mode in ("scale", "add"):
        with pytest.raises(ProbeError, match=f"mode '{mode}' needs value"):
            FeatureIntervention(cc, S, mode=mode, model_name="rl")
    with pytest.raises(ProbeError, match="takes no value"):
        FeatureIntervention(cc, S, mode="zero", value=0.0, model_name="rl")
    with pytest.raises(ProbeError, match="not a number"):
        FeatureIntervention(cc, S, mode="set", value="big", model_name="rl")
    with pytest.raises(ProbeError, match="finite"):
        FeatureIntervention(cc, S, mode="set", value=float("nan"), model_name="rl")
    with pytest.raises(ProbeError, match=r"'sft'.*\['base', 'rl'\]"):
        FeatureIntervention(cc, S, model_name="sft")
    with pytest.raises(ProbeError, match=r"\['base', 'rl'\].*model_name"):
        FeatureIntervention(cc, S)
    with pytest.raises(ProbeError, match="max_activations"):
        FeatureIntervention(cc, S, mode="steer", model_name="rl")
    with pytest.raises(ProbeError, match=rf"\[{N_FEATURES}\]"):
        FeatureIntervention(cc, S, mode="steer", model_name="rl", max_acts=torch.ones(3))
    with pytest.raises(ProbeError, match="trained at layer 2"):
        FeatureIntervention(cc, S, model_name="rl", layer=3)
    with pytest.raises(ProbeError, match="holds no crosscoder"):
        FeatureIntervention("/nonexistent/cc", S, model_name="rl")
    untrained = random_crosscoder(activation="batchtopk")
    with pytest.raises(ProbeError, match="threshold"):
        FeatureIntervention(untrained, S, model_name="rl")
    # checks at attach time: the layer must exist in this model, the width must match
    deep = random_crosscoder(layer=7)
    with pytest.raises(ProbeError, match=r"layer 7 is out of range.*4 decoder blocks"):
        FeatureIntervention(deep, S, model_name="rl").attach(model)
    narrow = random_crosscoder(d=32)
    with pytest.raises(ProbeError, match="d_model 32.*hidden size is 64"):
        FeatureIntervention(narrow, S, model_name="rl").attach(model)
    assert not hasattr(model, "_posttrain_probe_feature_hooks")
    # at forward time: prompt lengths for another batch size; prompt positions without the model's mask
    inputs = encode(tokenizer, PROMPTS, "right")
    iv = FeatureIntervention(cc, S, model_name="rl", positions="prompt")
    with iv.attach(model), torch.no_grad():
        with iv.prompt_lengths([2, 3]), pytest.raises(ProbeError, match="2 entries.*batch of 3"):
            model(**inputs)
        with pytest.raises(ProbeError, match=">= 0"):
            with iv.prompt_lengths([-1, 2, 3]):
                pass
        with pytest.raises(ProbeError, match="attention mask"):
            model.model(input_ids=inputs["input_ids"])  # the inner model: no mask recorded
    with pytest.raises(ProbeError, match="width 64"):
        iv.edit(torch.zeros(2, 5))


def test_each_mode_is_one_affine_edit():
    """f' = a f + b with one constructor per mode: the change f' - f equals each mode's formula (docs/methods.md sec. 7)."""
    from posttrain_probe.interventions.features import FeatureEdit, feature_edit

    f = torch.relu(torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0)))
    max_s = torch.tensor([0.5, 2.0, 4.0])
    assert torch.equal(FeatureEdit.zero().change(f), -f)
    assert torch.equal(FeatureEdit.set(3.0).change(f), 3.0 - f)
    assert torch.equal(FeatureEdit.scale(0.25).change(f), f * (0.25 - 1.0))
    assert torch.equal(FeatureEdit.add(1.5).change(f), torch.full_like(f, 1.5))
    assert torch.equal(FeatureEdit.steer(2.0, max_s).change(f), 2.0 * max_s - f)
    assert torch.equal(feature_edit("steer", 2.0, max_s).change(f), FeatureEdit.steer(2.0, max_s).change(f))
    assert [
        (e.a, e.b)
        for e in (
            feature_edit("zero", None),
            feature_edit("set", 3.0),
            feature_edit("scale", 0.5),
            feature_edit("add", -1.0),
        )
    ] == [(0.0, 0.0), (0.0, 3.0), (0.5, 0.0), (1.0, -1.0)]
