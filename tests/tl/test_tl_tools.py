"""TransformerLens 4's analysis tools on lens_det models: the full residual decomposition, the logit lens,
SVDInterpreter and induction_loss, each checked against the model's own computation (float32).

Tolerances: "exact" is torch.equal (the tool runs the same ops as the forward). Sums of many components in a
different order than the forward get 1e-5 of the summed tensor's max magnitude (a few hundred fp32 ulps); a missing
or misplaced term is O(1) off.
"""

import pytest
import torch
from transformer_lens import SVDInterpreter, evals, utilities

import lens_det
from lens_det.loading import from_hf_model
from lens_det.tokenizer import char_tokenizer
from tests.helpers import ALL, batch

# every head result and neuron output is added to the residual as it is (VaultGemma: Gemma 2 without post-norms)
ADDITIVE = ["tiny-bloom", "tiny-gemma", "tiny-vaultgemma"]
# post-norms / residual from the norm output / layer_scalar (tiny-gemma4)
NOT_ADDITIVE = ["tiny-gemma2", "tiny-gemma3", "tiny-bloom-resid", "tiny-gemma4", "tiny-gemma4-ple", "tiny-gemma4-moe",
                "tiny-gemma3n"]
ONE_STREAM = [n for n in ALL if n != "tiny-gemma3n"]  # Gemma 3n's final norm reads AltUp's streams' mean


def close(a, b, rel=1e-5):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rel * scale, f"max err {err} > {rel} * {scale}"


@pytest.mark.parametrize("name", ADDITIVE)
def test_full_resid_decomposition_sums_to_the_residual_stream(model_pair, name):
    model = model_pair(name)[1]
    tokens, mask = batch("left", model.cfg.d_vocab)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    assert labels[: L * H] == model.all_head_labels and labels[-2:] == ["embed", "bias"]
    assert len(labels) == stack.shape[0] == L * H + L * model.cfg.d_mlp + 2
    close(stack.sum(0), cache["resid_post", -1])
    for layer in range(L):  # into an attention layer (resid_pre) and into an MLP (resid_mid), neurons collapsed
        close(cache.get_full_resid_decomposition(layer).sum(0), cache[f"blocks.{layer}.hook_resid_pre"])
        mid = cache.get_full_resid_decomposition(layer, mlp_input=True, expand_neurons=False)
        close(mid.sum(0), cache[f"blocks.{layer}.hook_resid_mid"])


@pytest.mark.parametrize("name", ADDITIVE)
def test_accumulated_bias_is_the_sum_of_the_output_biases(model_pair, name):
    model = model_pair(name)[1]
    b = model.blocks  # TL's definition, summed in TL's order: b_O, b_out of each earlier block, then b_O of `layer`
    b_out = [blk.mlp.b_out if blk.mlp.b_out is not None else torch.zeros(model.cfg.d_model) for blk in b]
    expected = torch.zeros(model.cfg.d_model) + b[0].attn.b_O + b_out[0] + b[1].attn.b_O
    assert torch.equal(model.accumulated_bias(1, mlp_input=True), expected)
    assert torch.equal(model.accumulated_bias(2, include_mlp_biases=False),
                       torch.zeros(model.cfg.d_model) + b[0].attn.b_O + b[1].attn.b_O)
    assert torch.equal(model.accumulated_bias(0), torch.zeros(model.cfg.d_model))
    with pytest.raises(ValueError, match="mlp_input"):
        model.accumulated_bias(model.cfg.n_layers, mlp_input=True)


@pytest.mark.parametrize("name", NOT_ADDITIVE)
def test_full_resid_decomposition_refuses_where_it_would_not_sum(model_pair, name):
    model = model_pair(name)[1]
    tokens, _ = batch("none", model.cfg.d_vocab)
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(ValueError, match="decompose_resid"):
        cache.get_full_resid_decomposition()
    # ...because it really would not: heads + neurons + embed + bias miss the residual stream by O(1).
    stack = torch.cat([cache.stack_head_results(), cache.stack_neuron_results(model.cfg.n_layers),
                       cache["hook_embed"][None]])
    resid = cache["resid_post", -1]
    assert (stack.sum(0) - resid).abs().max() > 1e-2 * resid.abs().max()


@pytest.mark.parametrize("name", ONE_STREAM)
def test_logit_lens_reads_each_layer_through_ln_final_and_the_unembedding(model_pair, name):
    model = model_pair(name)[1]
    tokens, mask = batch("left", model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    lens = cache.logit_lens(positions=slice(None))
    L = model.cfg.n_layers
    assert lens.labels == [f"{i}_pre" for i in range(L)] + ["final_post"]
    assert torch.equal(lens.values[-1], logits)  # final soft-cap included (Gemma 2/3), exact
    for i in range(L):  # the same ops as the forward's tail on that layer's stream: exact
        assert torch.equal(lens.values[i], model.unembed(model.ln_final(cache[f"blocks.{i}.hook_resid_pre"])))


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma2"])
def test_svd_interpreter_reads_tl_parameters(model_pair, name):
    model = model_pair(name)[1]
    svd, k = SVDInterpreter(model), 3
    W_U = model.W_U
    # w_out: right singular vectors of W_out [d_mlp, d_model], projected on the unembedding. Same SVD call: exact.
    _, _, Vh = torch.linalg.svd(model.blocks[1].mlp.W_out)
    assert torch.equal(svd.get_singular_vectors("w_out", layer_index=1, num_vectors=k)[:, 0], W_U.T @ Vh[:k].T)
    # w_in: TL multiplies W_in^T by ln2's gain (1 + w for Gemma's RMSNorm).
    gain = model.blocks[1].ln2.w + (1.0 if model.cfg.rmsnorm_unit_offset else 0.0)
    _, _, Vh = torch.linalg.svd(model.blocks[1].mlp.W_in.T * gain)
    assert torch.equal(svd.get_singular_vectors("w_in", layer_index=1, num_vectors=k)[:, 0], W_U.T @ Vh[:k].T)
    # OV of head 1: its vectors must span the top right-singular subspace of W_V[1] @ W_O[1] (up to sign and
    # rotation inside the subspace: 1e-4 on the projector, fp32 SVD of a rank-d_head matrix).
    ov = svd.get_singular_vectors("OV", layer_index=1, head_index=1, num_vectors=k)[:, 0]
    _, _, Vh = torch.linalg.svd(model.W_V[1, 1] @ model.W_O[1, 1])
    v_tl = torch.linalg.lstsq(W_U.T, ov).solution  # [d_model, k]: recover the vectors from their projection
    torch.testing.assert_close((Vh[:k] @ v_tl).abs(), torch.eye(k), atol=1e-4, rtol=0)


def test_induction_loss_is_the_models_own_loss_on_the_repeated_half():
    from lens_det.config import hf_config_from_name
    from transformers import AutoModelForCausalLM

    hf_cfg = hf_config_from_name("tiny-gemma2")
    hf_cfg.vocab_size = 20000  # TL draws token ids from [100, 20000)
    torch.manual_seed(0)
    model = from_hf_model(AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager"))
    model.tokenizer = char_tokenizer(model.cfg)
    torch.manual_seed(1)
    got = evals.induction_loss(model, batch_size=2, subseq_len=6, device="cpu")
    torch.manual_seed(1)
    tokens = torch.randint(100, 20000, (2, 6)).repeat(1, 2)
    tokens[:, 0] = model.tokenizer.bos_token_id
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(got, per_token[:, 7:].mean(), rtol=1e-6, atol=0)  # same log-softmax, other order


def test_tl_tools_that_tokenize_without_a_mask_say_what_to_write():
    """test_prompt and detect_head treat to_tokens' result as the token tensor; lens_det's to_tokens keeps the mask,
    so they stop with the idiom to use instead of running on a silently dropped mask."""
    from transformer_lens import head_detector

    model = lens_det.from_config("tiny-gemma2", seed=0)
    with pytest.raises(AttributeError, match="tokens, mask = model.to_tokens"):
        utilities.test_prompt("ab", "c", model, print_details=False)
    with pytest.raises(AttributeError, match="tokens, mask = model.to_tokens"):
        head_detector.detect_head(model, ["abcabc"], "previous_token_head")


@pytest.mark.parametrize("name", ALL)
def test_hook_mlp_in_feeds_only_the_mlp(model_pair, name):
    """TL's hook_mlp_in: off by default (a hook on it raises); on, it changes no bit of any other hook (its HF
    reference, ln2's input, is checked at tolerance 0 in tests/parity); an edit reaches the MLP but, unless the
    residual branch starts from the norm (residual_from_norm), not resid_post's residual term."""
    model = model_pair(name)[1]
    tokens, mask = batch("left", model.cfg.d_vocab)
    with pytest.raises(ValueError, match=r"set_use_hook_mlp_in\(True\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_in", lambda x, hook: x)])
    logits, plain = model.run_with_cache(tokens, attention_mask=mask)
    model.set_use_hook_mlp_in(True)
    try:
        logits_on, cache = model.run_with_cache(tokens, attention_mask=mask)
        assert torch.equal(logits_on, logits) and all(torch.equal(plain[k], cache[k]) for k in plain.keys())
        assert torch.equal(cache["blocks.0.hook_mlp_in"], cache["blocks.0.hook_resid_mid"])
        zero = ("blocks.0.hook_mlp_in", lambda x, hook: torch.zeros_like(x))
        with model.hooks(fwd_hooks=[zero]):
            _, edited = model.run_with_cache(tokens, attention_mask=mask)
    finally:
        model.set_use_hook_mlp_in(False)
    ln2_of_zero = model.blocks[0].ln2(torch.zeros_like(plain["blocks.0.hook_resid_mid"]))
    assert torch.equal(edited["blocks.0.ln2.hook_normalized"], ln2_of_zero)  # the MLP read the edit
    assert torch.equal(edited["blocks.0.hook_resid_mid"], plain["blocks.0.hook_resid_mid"])  # not written back
    if not model.config.residual_from_norm and model.config.n_streams == 1:  # (AltUp corrects the streams after)
        resid = edited["blocks.0.hook_resid_mid"] + edited["blocks.0.hook_mlp_out"]
        if model.config.d_per_layer_input:  # Gemma 4 PLE: a third sub-block's output is added too
            resid = resid + edited["blocks.0.hook_ple_out"]
        if model.config.layer_scalar:  # Gemma 4: the block's output is scaled
            resid = resid * model.blocks[0].layer_scalar
        assert torch.equal(edited["blocks.0.hook_resid_post"], resid)


def test_a_hook_on_an_unknown_name_says_what_exists(model_pair):
    """A misspelt hook name gets close matches (not a bare KeyError); TL's QKV-input hooks, off by default, name
    the switch (hook_attn_in: set_use_attn_in; hook_q/k/v_input: set_use_split_qkv_input)."""
    model = model_pair("tiny-gemma2")[1]
    tokens, _ = batch("none", model.cfg.d_vocab)
    with pytest.raises(ValueError, match=r"set_use_split_qkv_input\(True\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_q_input", lambda x, hook: x)])
    with pytest.raises(ValueError, match=r"set_use_attn_in\(True\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_in", lambda x, hook: x)])
    with pytest.raises(ValueError, match="did you mean blocks.0.hook_resid_mid"):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mdi", lambda x, hook: x)]):
            pass


def _replace_head(name, head, value):
    def hook(x, hook):
        x[:, :, head] = value  # TL's in-place patching idiom
        return x
    return (name, hook)


@pytest.mark.parametrize("name", ALL)
def test_split_qkv_input_edits_reach_only_their_head(model_pair, name):
    """TL's path patching into Q/K/V inputs: hook_q_input [batch, pos, head, d_model] and hook_k_input /
    hook_v_input [batch, pos, kv_head, d_model] are copies of resid_pre; unedited, every hook stays bit-identical
    (HF's fused path runs); an in-place edit of one kv head's value input changes that head's values, computed as
    ln1(edit) @ W_V[head] + b_V[head] (float32 rounding of a per-head GEMM: 1e-5 of the scale), and no bit of the
    queries, keys or other heads' values."""
    model = model_pair(name)[1]
    tokens, mask = batch("left", model.cfg.d_vocab)
    logits, plain = model.run_with_cache(tokens, attention_mask=mask)
    other = torch.randn(plain["blocks.1.hook_resid_pre"].shape, generator=torch.Generator().manual_seed(0))
    head = model.cfg.n_key_value_heads - 1
    model.set_use_split_qkv_input(True)
    try:
        logits_on, cache = model.run_with_cache(tokens, attention_mask=mask)
        assert torch.equal(logits_on, logits) and all(torch.equal(plain[k], cache[k]) for k in plain.keys())
        for kind, n in (("q", model.cfg.n_heads), ("k", model.cfg.n_key_value_heads),
                        ("v", model.cfg.n_key_value_heads)):
            # copies of what ln1 reads: resid_pre, or on an AltUp model (Gemma 3n) its stream-0 prediction
            resid = plain["blocks.1.altup.hook_predictions"][0] if model.config.n_streams > 1 else \
                plain["blocks.1.hook_resid_pre"]
            assert torch.equal(cache[f"blocks.1.hook_{kind}_input"], resid[:, :, None].expand(-1, -1, n, -1))
        with model.hooks(fwd_hooks=[_replace_head("blocks.1.hook_v_input", head, other)]):
            _, edited = model.run_with_cache(tokens, attention_mask=mask)
    finally:
        model.set_use_split_qkv_input(False)
    for hook in ("attn.hook_q", "attn.hook_k", "hook_resid_pre"):
        assert torch.equal(edited[f"blocks.1.{hook}"], plain[f"blocks.1.{hook}"]), hook
    v, v_plain = edited["blocks.1.attn.hook_v"], plain["blocks.1.attn.hook_v"]
    keep = [h for h in range(v.shape[2]) if h != head]
    assert torch.equal(v[:, :, keep], v_plain[:, :, keep])
    expected = model.blocks[1].ln1(other) @ model.blocks[1].attn._W_V[head] + model.blocks[1].attn._b_V[head]
    torch.testing.assert_close(v[:, :, head], expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma"])
def test_attn_in_edit_of_every_head_equals_an_edit_of_ln1_output(model_pair, name):
    """hook_attn_in (MHA/MQA-free models: one input per head for its q, k and v): giving every head the same input
    X equals making the attention read ln1(X) (an edit of ln1.hook_normalized), up to the per-head GEMM's rounding
    (1e-5 of the logits' scale); with GQA it is refused, naming the split inputs."""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    x = torch.randn(*tokens.shape, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    normalized = model.blocks[0].ln1(x)
    if model.cfg.n_rep > 1:
        with pytest.raises(ValueError, match="set_use_split_qkv_input"):
            model.set_use_attn_in(True)
        return
    reference = model.run_with_hooks(tokens, attention_mask=mask,
                                     fwd_hooks=[("blocks.0.ln1.hook_normalized", lambda t, hook: normalized)])
    model.set_use_attn_in(True)
    try:
        with pytest.raises(ValueError, match="set_use_attn_in\\(False\\)"):
            model.set_use_split_qkv_input(True)
        edited = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[
            ("blocks.0.hook_attn_in", lambda t, hook: x[:, :, None].expand_as(t).clone())])
    finally:
        model.set_use_attn_in(False)
    if model.cfg.residual_from_norm:
        pytest.skip("the residual branch reads ln1's output, which only the ln1 edit changes")
    torch.testing.assert_close(edited, reference, rtol=0, atol=1e-5 * reference.abs().max().item())
