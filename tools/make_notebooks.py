"""Write notebooks/*.ipynb from the cell sources below (run by hand after editing; the test suite executes the
committed notebooks). Every notebook runs on a tiny random model by default (LENS_DET_TINY picks the tiny
config); set LENS_DET_MODEL to a checkpoint (hub name or local directory) to run it on real weights."""

from pathlib import Path

import nbformat

SETUP = '''import os
import torch
import matplotlib.pyplot as plt
import lens_det
from lens_det.parity.models import random_hf_model

MODEL = os.environ.get("LENS_DET_MODEL")  # e.g. "bigscience/bloom-560m"; unset: a tiny random model
TINY = os.environ.get("LENS_DET_TINY", "{default}")  # which tiny config, e.g. "tiny-gemma4"'''

NOTEBOOKS = {
    "01_quickstart": [
        '''# lens_det quickstart
Load a model, cache every activation, look at attention patterns and a logit lens.''',
        SETUP.format(default="tiny-gemma2"),
        '''if MODEL:
    model = lens_det.from_pretrained(MODEL)
    tokens, mask = model.to_tokens(["The Eiffel Tower is in the city of", "Hello"])
else:
    model = lens_det.from_hf_model(random_hf_model(TINY))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding
print(model.cfg)''',
        '''logits, cache = model.run_with_cache(tokens, attention_mask=mask, position_ids="mask")
print(len(cache.keys()), "hook points cached, e.g.", list(cache.keys())[:6])
cache["blocks.0.attn.hook_pattern"].shape  # [batch, head, query_pos, key_pos]''',
        '''fig, axes = plt.subplots(1, model.cfg.n_heads, figsize=(3 * model.cfg.n_heads, 3.4), layout="constrained")
for head, ax in enumerate(axes):
    image = ax.imshow(cache["blocks.1.attn.hook_pattern"][0, head].float(), cmap="Blues", vmin=0, vmax=1)
    ax.set_title(f"layer 1, head {head}", fontsize=9)
    ax.set_xticks(range(0, tokens.shape[1], 2)); ax.set_yticks(range(0, tokens.shape[1], 2))
    ax.set_xlabel("key position")
axes[0].set_ylabel("query position")
fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="attention weight")
fig.suptitle("attention patterns of the first prompt (row = query, column = key it attends to)", fontsize=10)
plt.show()''',
        '''# Logit lens: the residual stream after each layer, through the final norm and the unembedding.
# (Gemma 3n's final norm reads the mean of its AltUp streams, not one residual stream: no logit lens there.)
from matplotlib.ticker import MaxNLocator
if model.config.n_streams > 1:
    print("logit lens: not defined on this multi-stream (AltUp) model; the final norm reads streams_out.hook_mean")
else:
    resid, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    lens_logits = resid[:, 0, -1] @ model.W_U
    final_token = logits[0, -1].argmax()
    rank = (lens_logits > lens_logits[:, final_token, None]).sum(-1)
    plt.figure(figsize=(6, 3.5), layout="constrained")
    plt.plot(labels, rank.numpy(), marker="o")
    plt.ylim(-0.5, max(5, 1.05 * int(rank.max()) + 1)); plt.gca().yaxis.set_major_locator(MaxNLocator(integer=True))
    plt.xticks(rotation=60); plt.xlabel("residual stream: i_pre = before layer i, final_post = after the final norm")
    plt.ylabel("rank of the final prediction\\n(0 = already the top token)")
    plt.title("logit lens, first prompt, last position")
    plt.show()''',
    ],
    "02_kv_cache_parity": [
        '''# KV-cache parity
Every hook point against Hugging Face, cache off and on; then the TransformerLens 2.8 Bloom bug (cached steps used
row 0 of the ALiBi bias) injected, caught, and located.''',
        SETUP.format(default="tiny-bloom"),
        '''from transformers import AutoModelForCausalLM
from lens_det.parity import compare, faults

if MODEL:
    hf = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="eager").eval()
else:
    hf = random_hf_model(TINY)
model = lens_det.from_hf_model(hf)
tokens = torch.randint(0, model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(tokens)
mask[0, :4] = 0
report = compare(model, hf, tokens, mask, prefill=8)   # uncached, then prefill 8 + 8 cached steps
print(report.to_text())''',
        '''# TransformerLens 2.8's Bloom bug (ALiBi row 0 on cached steps); for a RoPE model its analogue, cached
# steps rotated at the wrong position
def injected_bug():
    return faults.alibi_row0_on_cached_steps() if model.cfg.positional == "alibi" else faults.rope_offset_after_cache()

with injected_bug():
    buggy = compare(model, hf, tokens, mask, prefill=8)
print(buggy.to_text())
buggy.first_divergence''',
        '''fig = buggy.plot()
plt.show()''',
        '''# Greedy text with the cache on equals cache off (what TransformerLens 2.8 got wrong).
on = model.generate(tokens, mask, max_new_tokens=12, stop_tokens=[])
off = model.generate(tokens, mask, max_new_tokens=12, stop_tokens=[], use_kv_cache=False)
print("cache on == cache off:", torch.equal(on.tokens, off.tokens))
with injected_bug():
    broken = model.generate(tokens, mask, max_new_tokens=12, stop_tokens=[])
gap = max(float((a - b).abs().max()) for a, b in zip(broken.logits, off.logits))
print(f"with the bug injected the cached logits move by up to {gap:.3g}; same text: "
      f"{torch.equal(broken.tokens, off.tokens)}")''',
    ],
    "03_activation_patching": [
        '''# Activation patching
Which layers and positions carry the information that separates a clean from a corrupted prompt; then a patch during
generation that persists through the KV cache.''',
        SETUP.format(default="tiny-gemma2"),
        '''from lens_det.patching import generate_with_patches, logit_diff, patch_hook, patch_sweep

if MODEL:
    model = lens_det.from_pretrained(MODEL)
    clean, _ = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted, _ = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    metric = logit_diff(model.to_single_token(" Mary"), model.to_single_token(" John"))
else:
    model = lens_det.from_hf_model(random_hf_model(TINY))
    clean = torch.randint(0, model.cfg.d_vocab, (1, 8), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone(); corrupted[0, 3] = (clean[0, 3] + 7) % model.cfg.d_vocab
    last = model(clean)[0, -1]
    metric = logit_diff(int(last.argmax()), int(last.argmin()))''',
        '''by_pos = patch_sweep(model, clean, corrupted, metric, hook="resid_pre", by="pos")
by_pos.plot()
plt.show()
by_pos.to_frame().head()''',
        '''by_head = patch_sweep(model, clean, corrupted, metric, hook="attn.hook_z", by="head")
by_head.plot()
plt.show()''',
        '''# Patch layer 0's values at the token fed on generation step 2: later steps still see it
# (it is in the cache), and each step's logits equal one uncached forward over the final text with the same patch.
PATCHED = 2
n = clean.shape[1]
noise = torch.randn(1, n + 8, model.cfg.n_key_value_heads, model.cfg.d_head,
                    generator=torch.Generator().manual_seed(0))
patch = patch_hook(model, noise, position=n + 1)
with lens_det.deterministic():
    out = generate_with_patches(model, clean, patches={PATCHED: [("blocks.0.attn.hook_v", patch)]}, max_new_tokens=6,
                                stop_tokens=[])
    plain = model.generate(clean, max_new_tokens=6, stop_tokens=[])
    rerun = model.run_with_hooks(out.tokens[:, :-1], position_ids="mask", fwd_hooks=[("blocks.0.attn.hook_v", patch)])
effect = [float((a - b).abs().max()) for a, b in zip(out.logits, plain.logits)]
same = [torch.equal(step, rerun[:, n - 1 + i]) for i, step in enumerate(out.logits)]
print("effect per step:", [f"{e:.3g}" for e in effect]); print("equal to the uncached re-run:", same)
fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
bars = ax.bar(range(len(effect)), effect, color=["C3" if t == PATCHED else "C0" for t in range(len(effect))])
for t, e in enumerate(effect):
    if e == 0:
        ax.text(t, 0, "0", ha="center", va="bottom")  # no bar: the logits are unchanged, bit for bit
ax.set_ylim(0, 1.45 * max(effect))  # headroom: the legend sits above the bars
ax.legend([bars[PATCHED], bars[-1]],
          [f"step {PATCHED}: the patched step", "later steps: the patch read from the KV cache"],
          loc="upper left", fontsize=8)
ax.set(title=f"Effect of patching layer 0's hook_v at generation step {PATCHED}",
       xlabel="generation step (0 = the prompt's forward)", ylabel="max |logit change| vs unpatched")
plt.show()''',
    ],
    "04_determinism": [
        '''# Determinism
A prompt's logits move with batch composition, prefill chunking and the cache in the default (HF-exact) mode; in
deterministic mode they are bitwise identical.''',
        SETUP.format(default="tiny-gemma3"),
        '''from lens_det.determinism import check_all

model = lens_det.from_pretrained(MODEL) if MODEL else lens_det.from_hf_model(random_hf_model(TINY))
prompt = torch.randint(0, model.cfg.d_vocab, (5,), generator=torch.Generator().manual_seed(0))
results = {}
for mode in ("default", "deterministic"):
    with lens_det.deterministic(mode == "deterministic"):
        results[mode] = check_all(model, prompt)
for mode, reports in results.items():
    print(mode, {check: f"{r.max_abs():.2g}" for check, r in reports.items()})
print(results["default"]["batch"].to_text(n_worst=3))''',
        '''# Max |diff| per check on a log axis; an exact 0 has no bar (a log axis cannot show it): it is written
# "0 = bit-identical" instead of being drawn as a tiny bar.
from lens_det.determinism import plot_checks
fig = plot_checks(results)
plt.show()''',
        '''# Greedy generation: alone vs inside a left-padded batch, bit for bit in deterministic mode.
companion = torch.randint(0, model.cfg.d_vocab, (1, 9), generator=torch.Generator().manual_seed(1))
tokens = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), prompt[None]], 1), companion])
mask = torch.ones_like(tokens); mask[0, :4] = 0
with lens_det.deterministic():
    alone = model.generate(prompt[None], max_new_tokens=8, stop_tokens=[])
    batched = model.generate(tokens, mask, max_new_tokens=8, stop_tokens=[])
print("same tokens:", torch.equal(alone.tokens[0], batched.tokens[0, 4:]))
print("same logits every step:", all(torch.equal(a[0], b[0]) for a, b in zip(alone.logits, batched.logits)))''',
    ],
    "05_saes": [
        '''# Sparse autoencoders and transcoders
Random SAEs written and read back in the three file formats (SAELens, Gemma Scope 1 and 2), spliced into the model
(the error term leaves the logits bit for bit as they were), a feature heatmap, steering a feature during generation
(cache on = cache off), feature attribution, and the features each generating step computed.''',
        SETUP.format(default="tiny-gemma2"),
        '''import tempfile
from pathlib import Path
from lens_det.sae import SAE, SAEConfig, features, hook_width

if MODEL:
    model = lens_det.from_pretrained(MODEL)
    tokens, _ = model.to_tokens("The Eiffel Tower is in the city of Paris, and the Colosseum is in")
    corrupt, _ = model.to_tokens("The Eiffel Tower is in the city of Rome, and the Colosseum is in")
else:
    model = lens_det.from_hf_model(random_hf_model(TINY))
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    corrupt = tokens.clone(); corrupt[0, 3] = (tokens[0, 3] + 7) % model.cfg.d_vocab
L = model.cfg.n_layers // 2
RESID, Z = f"blocks.{L}.hook_resid_post", f"blocks.{L}.attn.hook_z"
MLP_IN, MLP_OUT = f"blocks.{L}.ln2.hook_normalized", f"blocks.{L}.hook_mlp_out"
_, cache = model.run_with_cache(tokens, names_filter=[RESID, Z, MLP_IN, MLP_OUT])
gen = torch.Generator().manual_seed(0)

def random_sae(hook, architecture="jumprelu", hook_out=None, k=None, skip=False, d_sae=256, **metadata):
    """Random weights scaled to the activations: pre-activations about N(0, 1), reconstructions of their size."""
    x_std, y_std = (float(cache[h].float().std()) for h in (hook, hook_out or hook))
    d_in, d_out = hook_width(model.config, hook), hook_width(model.config, hook_out or hook)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook, architecture=architecture, hook_name_out=hook_out,
                        d_out=d_out if hook_out else None, k=k, skip=skip, metadata=metadata))
    scales = {"W_enc": 1 / (d_in**0.5 * x_std), "b_enc": 0.1, "W_dec": y_std / d_sae**0.5 * 4, "b_dec": 0.1 * y_std,
              "W_skip": 0.1 * y_std / (d_in**0.5 * x_std)}
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))  # a feature fires where pre > 0.5 .. 1.5
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scales[name])
    return sae

resid_sae = random_sae(RESID, hf_hook_point_in=f"model.layers.{L}.output")
topk_sae = random_sae(Z, "topk", k=8)
transcoder = random_sae(MLP_IN, hook_out=MLP_OUT, skip=True,
                        hf_hook_point_in=f"model.layers.{L}.pre_feedforward_layernorm.output",
                        hf_hook_point_out=f"model.layers.{L}.post_feedforward_layernorm.output")
for sae in (resid_sae, topk_sae, transcoder):
    c = sae.cfg
    print(f"{c.architecture:8} {c.hook_name} -> {c.out_hook}: d_in {c.d_in}, d_sae {c.d_sae}, d_out {c.out_width}"
          f"{', skip' if c.skip else ''}{f', k {c.k}' if c.k else ''}")''',
        '''# Write each SAE in every format that can hold it, load it back with load_sae, compare with the original.
# Gemma Scope 1 files hold no site: it comes from the folder names (repo suffix -res, layer_L).
def same(a, b):
    fields = ("d_in", "d_sae", "hook_name", "out_hook", "architecture", "k", "skip")
    weights_a, weights_b = dict(a.named_parameters()), dict(b.named_parameters())
    return (all(getattr(a.cfg, f) == getattr(b.cfg, f) for f in fields) and weights_a.keys() == weights_b.keys()
            and all(torch.equal(w, weights_b[n]) for n, w in weights_a.items()))

root = Path(tempfile.mkdtemp())
writes = [(resid_sae, "saelens", "resid_saelens"),
          (resid_sae, "gemma_scope_1", f"gemma-scope-2b-pt-res/layer_{L}/width_16k/average_l0_10"),
          (resid_sae, "gemma_scope_2", "resid_gemma_scope_2"),
          (topk_sae, "saelens", "topk_saelens"),
          (transcoder, "saelens", "transcoder_saelens"),
          (transcoder, "gemma_scope_2", "transcoder_gemma_scope_2")]
for sae, fmt, folder in writes:
    lens_det.save_sae(sae, root / folder, fmt)
    loaded = lens_det.load_sae(root / folder, model=model)
    files = sorted(p.name for p in (root / folder).iterdir())
    print(f"{fmt:13} {folder:45} {files}: loads as {loaded.cfg.hook_name} -> {loaded.cfg.out_hook}, "
          f"equal to the original: {same(sae, loaded)}")

if MODEL and os.environ.get("LENS_DET_SAE"):
    sae = lens_det.load_sae(os.environ["LENS_DET_SAE"], model=model)
    print("real SAE:", sae.cfg.source, sae.cfg.hook_name, "d_sae", sae.cfg.d_sae)
else:
    if MODEL:
        print("LENS_DET_SAE is not set: the rest of the notebook uses the random residual SAE (set it to the "
              "directory of a real SAE for this model, e.g. a Gemma Scope folder)")
    sae = resid_sae
ACTS = f"{sae.cfg.hook_name}.hook_sae_acts_post"''',
        '''# Splicing: with the error term the model computes exactly what it computed without the SAEs;
# without it, what flows on is the SAE's reconstruction.
with torch.no_grad():
    clean = model(tokens)
    with model.saes([resid_sae, topk_sae, transcoder], use_error_term=True):
        print("attached:", list(model.acts_to_saes))
        print("use_error_term=True, all three spliced: logits bit-identical:", torch.equal(model(tokens), clean))
    print("attached after the block:", list(model.acts_to_saes))
    for each in (resid_sae, topk_sae, transcoder):
        model.add_sae(each, use_error_term=False)
        replaced = model(tokens)
        model.reset_saes()
        print(f"use_error_term=False at {each.cfg.out_hook:26}: logits equal: {torch.equal(replaced, clean)}, "
              f"max |change| {float((replaced - clean).abs().max()):.3g}")''',
        '''# Feature activations over the prompt's tokens: the 16 features most active in total.
acts = features.feature_acts(model, sae, tokens)[0].float()  # [pos, d_sae]
with model.saes([sae], use_error_term=True):
    _, sae_cache = model.run_with_cache(tokens, names_filter=ACTS)
print("feature_acts == run_with_cache's", ACTS, ":", torch.equal(acts, sae_cache[ACTS][0].float()))
top = acts.sum(0).topk(16).indices
labels = model.to_str_tokens(tokens[0]) if MODEL else [f"{p}: id {t}" for p, t in enumerate(tokens[0].tolist())]
fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
image = ax.imshow(acts[:, top], cmap="viridis", aspect="auto")
ax.set_xticks(range(len(top)), [str(f) for f in top.tolist()], rotation=60, fontsize=8)
ax.set_yticks(range(len(labels)), labels, fontsize=8)
ax.set(xlabel="feature (the 16 most active over the prompt)", ylabel="token (position: id)",
       title=f"SAE feature activations at {sae.cfg.hook_name}")
fig.colorbar(image, ax=ax, label="activation (hook_sae_acts_post)")
plt.show()''',
        '''# Steering: clamp the most active feature to 5x its largest activation at every position, during generation.
FEATURE = int(top[0])
name, clamp = features.steer(sae, FEATURE, value=5 * float(acts[:, FEATURE].max()), mode="clamp")
with lens_det.deterministic(), model.saes([sae], use_error_term=True):
    plain = model.generate(tokens, max_new_tokens=8, stop_tokens=[])
    cached = model.generate(tokens, max_new_tokens=8, stop_tokens=[], fwd_hooks=[(name, clamp)])
    uncached = model.generate(tokens, max_new_tokens=8, stop_tokens=[], fwd_hooks=[(name, clamp)],
                              use_kv_cache=False)
n = tokens.shape[1]
print("unsteered:        ", plain.tokens[0, n:].tolist())
print("steered, cache on: ", cached.tokens[0, n:].tolist())
print("steered, cache off:", uncached.tokens[0, n:].tolist())
print("steered tokens, cache on == cache off:", torch.equal(cached.tokens, uncached.tokens))
print("steered logits, cache on == cache off:", all(torch.equal(a, b) for a, b in zip(cached.logits, uncached.logits)))
print("steering changed the text:", not torch.equal(cached.tokens, plain.tokens))''',
        '''# Attribution: d metric / d feature activation, and attribution patching:
# (clean acts - corrupt acts) * gradient at the corrupt run.
last = model(tokens)[0, -1]
right, wrong = (int(i) for i in last.topk(2).indices)
metric = lambda logits: logits[0, -1, right] - logits[0, -1, wrong]  # noqa: E731
acts_attr, grad = features.feature_attribution(model, sae, tokens, metric)
print("feature_attribution: acts", tuple(acts_attr.shape), "equal to feature_acts:",
      torch.equal(acts_attr[0].float(), acts), "; gradient", tuple(grad.shape))
attribution = features.attribution_patching(model, sae, tokens, corrupt, metric)[0].sum(0)  # over positions
order = attribution.abs().topk(12).indices
fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
ax.bar(range(len(order)), attribution[order], color=["C0" if v > 0 else "C3" for v in attribution[order]])
ax.axhline(0, color="black", linewidth=0.8)
ax.set_xticks(range(len(order)), [str(f) for f in order.tolist()], fontsize=8)
ax.set(xlabel="feature (the 12 largest |attribution|)", ylabel="attribution to the logit difference",
       title="attribution patching of SAE features, summed over positions (blue +, red -)")
plt.show()''',
        '''# The features each generating forward computed (return_activations="steps"), cache on vs off.
with lens_det.deterministic(), model.saes([sae], use_error_term=True):
    on = model.generate(tokens, max_new_tokens=6, stop_tokens=[], return_activations="steps", names_filter=ACTS)
    off = model.generate(tokens, max_new_tokens=6, stop_tokens=[], return_activations="steps", names_filter=ACTS,
                         use_kv_cache=False)
steps_on, steps_off = on.activations[ACTS][0].float(), off.activations[ACTS][0].float()
print("recorded positions:", steps_on.shape[0], "(the prompt, then each generated token but the last)")
print("same tokens:", torch.equal(on.tokens, off.tokens), "; same feature activations every step:",
      torch.equal(steps_on, steps_off))
generated = steps_on[n:]
fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
image = ax.imshow(generated[:, top], cmap="viridis", aspect="auto")
ax.set_xticks(range(len(top)), [str(f) for f in top.tolist()], rotation=60, fontsize=8)
ax.set_yticks(range(generated.shape[0]), [f"step {s + 1}: id {t}" for s, t in
                                          enumerate(on.tokens[0, n:n + generated.shape[0]].tolist())], fontsize=8)
ax.set(xlabel="feature (as in the prompt heatmap)", ylabel="generated token fed back",
       title="feature activations of each generated token, as generation computed them")
fig.colorbar(image, ax=ax, label="activation")
plt.show()''',
    ],
}

def main() -> None:
    out = Path(__file__).resolve().parent.parent / "notebooks"
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_markdown_cell(cells[0])] + [nbformat.v4.new_code_cell(c) for c in cells[1:]]
        for i, cell in enumerate(nb.cells):
            cell.id = f"cell-{i}"  # stable ids: regenerating changes only what was edited
        nbformat.write(nb, out / f"{name}.ipynb")
        print("wrote", name)


if __name__ == "__main__":
    main()
