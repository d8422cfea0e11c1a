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
from matplotlib.ticker import MaxNLocator
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
