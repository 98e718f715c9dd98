"""An independent re-implementation of the long-context memory forms, for tests only (from the papers, not from the
package's code): patch-grid average pooling, ADEM-VL's multiscale slots, its `silu(x) silu(K)^T` read and its drop.

Nothing here imports memvp_peft. Written from:

* ADEM-VL (Hao et al. 2024, arXiv 2410.17779, and the authors' released `Avg2dSampler` / `Adapter`): the CLIP grid
  and its average pools are concatenated *before* the projector; every LLaMA block adds
  `s * (drop(silu(x) silu(K)^T)) V` to its FFN output, x the FFN's normalised input, `K = lambda f(z) + p_k`,
  `V = lambda f(z) + p_v`; the drop sorts each token's scores ascending, takes the one at index
  `int(drop_ratio * n)` as the threshold and zeroes every score strictly below it;
* average pooling: non-overlapping k x k means of the row-major patch grid (here as explicit block means).

K and V themselves are MemVP's (reference_memvp.reference_memory). GLU FFNs only (Llama): the read is added by a
forward hook on the whole `mlp`.

`their_forward` (below) is ADEM-VL's whole forward -- the CLIP blocks with their adapters, the CLS token through its
own projector placed after BOS and "Image: " ("Image: N/A" in rows without an image), every row cut back to its
length -- re-written from the authors' code and reading their checkpoint by their tensor names and `args`.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from reference_memvp import reference_memory


def block_means(features: torch.Tensor, out_side: int) -> torch.Tensor:
    """(M, g*g, D) row-major grids -> (M, out_side^2, D): the mean of each (g/out_side)^2 block, row-major."""
    count, tokens, width = features.shape
    side = math.isqrt(tokens)
    assert side * side == tokens and side % out_side == 0, (tokens, out_side)
    k = side // out_side
    out = torch.empty(count, out_side * out_side, width)
    for m in range(count):
        grid = features[m].reshape(side, side, width)
        for i in range(out_side):
            for j in range(out_side):
                out[m, i * out_side + j] = grid[i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(-1, width).mean(0)
    return out


def multiscale(features: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """ADEM-VL's sampler: the grid pooled to each count (the grid's own count = as it is), concatenated in order."""
    tokens = features.shape[1]
    parts = [features if c == tokens else block_means(features, math.isqrt(c)) for c in counts]
    return torch.cat(parts, dim=1)


def compress(features: torch.Tensor, config) -> torch.Tensor:
    """(B, N, D) or (B, I, N, D) -> (B, I*N', D): every image compressed on its own, then the images in order."""
    images = features if features.dim() == 4 else features[:, None]
    batch, count, tokens, width = images.shape
    flat = images.reshape(batch * count, tokens, width).float()
    if config.pool_kernel > 1:
        flat = block_means(flat, math.isqrt(tokens) // config.pool_kernel)
    elif config.pool_tokens is not None:
        flat = block_means(flat, math.isqrt(config.pool_tokens))
    elif config.multiscale_tokens:
        flat = multiscale(flat, config.multiscale_tokens)
    return flat.reshape(batch, count * flat.shape[1], width)


def adem_drop(scores: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """The authors' drop: ascending sort, threshold at index int(ratio * n), scores below it set to 0."""
    if drop_ratio <= 0:
        return scores
    ordered, _ = scores.sort(dim=-1)
    threshold = ordered[..., int(drop_ratio * scores.shape[-1])].unsqueeze(-1)
    return torch.where(scores < threshold, torch.zeros_like(scores), scores)


def form_read(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, config, act: Callable) -> torch.Tensor:
    if config.memory_read == "adem":
        scores = torch.matmul(F.silu(x), F.silu(keys).transpose(-1, -2))
    else:
        scores = act(torch.matmul(x, keys.transpose(-1, -2)))
    return config.memory_scale * torch.matmul(adem_drop(scores, config.drop_ratio), values)


def reference_form_logits(
    base_model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    config,
    input_ids: torch.Tensor,
    image_features: Optional[torch.Tensor] = None,
    image_mask: Optional[torch.Tensor] = None,
    own_slots: bool = False,
) -> torch.Tensor:
    """Logits of a Llama-family `base_model` (deep-copied, never modified) with the config's memory form hooked in;
    `own_slots`: a memory of exactly the (compressed) features' tokens, as a row of the variable form reads it."""
    model = copy.deepcopy(base_model).eval()
    features = None if image_features is None else compress(image_features, config)
    keys, values = reference_memory(state, config, features, image_mask, own_slots)
    for layer in model.model.layers:
        mlp = layer.mlp

        def hook(module, args, output, act=mlp.act_fn):
            return output + form_read(args[0], keys, values, config, act)

        mlp.register_forward_hook(hook)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def reference_gpt2_drop_logits(base_model, state, config, input_ids, image_features,
                               own_slots: bool = False) -> torch.Tensor:
    """GPT-2 (plain FFN) with MemVP's read and the drop: x captured at c_fc, `s drop(gelu(x K^T)) V` added at c_proj
    (`own_slots`: a memory of exactly the features' tokens)."""
    model = copy.deepcopy(base_model).eval()
    keys, values = reference_memory(state, config, image_features, own_slots=own_slots)
    for block in model.transformer.h:
        captured = {}

        def capture(module, args, captured=captured):
            captured["x"] = args[0]

        def add(module, args, output, captured=captured, act=block.mlp.act):
            return output + form_read(captured.pop("x"), keys, values, config, act)

        block.mlp.c_fc.register_forward_pre_hook(capture)
        block.mlp.c_proj.register_forward_hook(add)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ------------------------------------------------------------------------------------------------------------------
# ADEM-VL's whole model: the CLIP adapters, the CLS input token and its input layout. Written from the authors'
# repository (adem/model.py `Transformer.forward` / `insert_image_embeds` / `Avg2dSampler` / `Projector`,
# adem/adapter.py `Adapter` / `forward_llama` / `forward_clip`, clip/model.py `VisionTransformer.forward`), reading
# the checkpoint by the authors' own tensor names and `args`.


def _their_projector(model: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """`Projector.forward`: fc2(silu(fc1(x)))."""
    hidden = F.linear(x, model[f"{prefix}.fc1.weight"].float(), model[f"{prefix}.fc1.bias"].float())
    return F.linear(F.silu(hidden), model[f"{prefix}.fc2.weight"].float(), model[f"{prefix}.fc2.bias"].float())


def _their_clip_adapter(model: dict, block: int, x: torch.Tensor) -> torch.Tensor:
    """`Adapter.forward` without `vis_weight` (eval: dropout off): fc2(gelu(fc1(x))), no biases."""
    key = f"backbone.visual.transformer.resblocks.{block}.adapter_mlp"
    return F.linear(F.gelu(F.linear(x, model[f"{key}.fc1.weight"].float())), model[f"{key}.fc2.weight"].float())


def _attention(layer, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head self-attention (their `nn.MultiheadAttention`, no mask) from the block's q/k/v/out weights."""
    attn = layer.self_attn
    batch, tokens, width = x.shape
    split = lambda t: t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)  # noqa: E731
    q, k, v = (split(proj(x)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))


def their_clip_features(clip: torch.nn.Module, model: dict, images: torch.Tensor, adapter_scale: float = 0.1) -> torch.Tensor:
    """`VisionTransformer.forward` with `forward_clip`'s adapters: (B, 1 + N, D), CLS first, every token after
    ln_post, the last block not run (`resblocks[:-1]`)."""
    vision = clip.vision_model if hasattr(clip, "vision_model") and hasattr(clip.vision_model, "encoder") else clip
    embeddings = vision.embeddings
    x = embeddings.patch_embedding(images).flatten(2).transpose(1, 2)
    cls = embeddings.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + embeddings.position_embedding.weight
    x = vision.pre_layrnorm(x)
    heads = clip.config.num_attention_heads
    for block, layer in enumerate(vision.encoder.layers[:-1]):
        x = x + _attention(layer, layer.layer_norm1(x), heads)
        normed = layer.layer_norm2(x)
        x = x + layer.mlp(normed) + _their_clip_adapter(model, block, normed) * adapter_scale
    return vision.post_layernorm(x)


def their_avg2d_sampler(x: torch.Tensor, down_sample_num: Sequence[int]) -> torch.Tensor:
    """`Avg2dSampler.forward`, including its literal `gs == 16` (a grid side of 16 is kept as it is)."""
    batch, tokens, width = x.shape
    side = int(tokens ** 0.5)
    grid = x.reshape(batch, side, side, width).permute(0, 3, 1, 2)
    out = []
    for count in down_sample_num:
        gs = int(count ** 0.5)
        pooled = grid if gs == 16 else F.adaptive_avg_pool2d(grid, gs)
        out.append(pooled.reshape(batch, width, -1).permute(0, 2, 1))
    return torch.cat(out, dim=1)


def their_insert_image_embeds(examples, labels, image_embeds, prefix_img, prefix_nonimg, indicators):
    """`Transformer.insert_image_embeds`: [BOS, prefix, CLS, rest] (image rows) or [BOS, prefix_nonimg, rest], labels
    0 on the inserted positions, every row cut back to the input's length."""
    seqlen = examples.shape[1]
    new_examples, new_labels = [], []
    for i, (example, label) in enumerate(zip(examples, labels)):
        if indicators[i] > 0:
            inserted = torch.cat([prefix_img, image_embeds[i]], 0)
        else:
            inserted = prefix_nonimg
        new_examples.append(torch.cat([example[:1], inserted, example[1:]], 0)[:seqlen])
        new_labels.append(torch.cat([label[:1], torch.zeros(inserted.shape[0]).type_as(labels), label[1:]])[:seqlen])
    return torch.stack(new_examples), torch.stack(new_labels)


def _their_llama_read(x, image_embeds, emb1, emb2, drop_ratio):
    """`Adapter.forward` with `vis_weight`: silu(x) silu(image_embeds + emb1)^T, the drop, times (image_embeds + emb2)."""
    scores = F.silu(x) @ F.silu(image_embeds + emb1).permute(0, 2, 1)
    return adem_drop(scores, drop_ratio) @ (image_embeds + emb2)


def their_forward(llama: torch.nn.Module, clip: torch.nn.Module, checkpoint: dict, examples: torch.Tensor,
                  labels: torch.Tensor, images: torch.Tensor, indicators: Sequence[int], prefix_img: torch.Tensor,
                  prefix_nonimg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Transformer.forward` up to the logits (and the labels it scores them with), in fp32 and eval mode, on a copy
    of the HF `llama` (its blocks are the authors' LLaMA blocks; the read is added to each FFN's output).

    `examples`/`labels` as their dataset makes them: BOS first, padded with 0 to a fixed length, label 0 = no loss.
    Returns (logits (B, S, V), labels (B, S)), S the sequence after the insertion and the cut to the last label."""
    model, args = checkpoint["model"], checkpoint["args"]
    model = {key.removeprefix("module."): value for key, value in model.items()}
    feats = their_clip_features(clip, model, images)
    image_embeds = _their_projector(model, "adapter_proj", their_avg2d_sampler(feats[:, 1:, :], args.down_sample_num))
    image_embeds = image_embeds * args.beta * torch.tensor(indicators, dtype=torch.float32).view(-1, 1, 1)
    emb1, emb2 = model["adapter_emb1"].float(), model["adapter_emb2"].float()
    llama = copy.deepcopy(llama).eval()
    tok_embeddings = llama.get_input_embeddings()
    with torch.no_grad():
        h = tok_embeddings(examples)
        if not args.no_cls:
            cls_tokens = _their_projector(model, "adapter_proj_cls", feats[:, [0], :])
            h, labels = their_insert_image_embeds(h, labels, cls_tokens, tok_embeddings(prefix_img),
                                                  tok_embeddings(prefix_nonimg), indicators)
        seqlen = int((labels > 0).float().nonzero(as_tuple=False)[:, 1].max()) + 1
        h, labels = h[:, :seqlen], labels[:, :seqlen]
        for layer in llama.model.layers:
            def hook(module, hook_args, output):
                return output + _their_llama_read(hook_args[0], image_embeds, emb1, emb2, args.drop_ratio) * args.alpha

            layer.mlp.register_forward_hook(hook)
        logits = llama(inputs_embeds=h).logits  # their mask: causal only
    return logits, labels


def their_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Their criterion: CrossEntropyLoss(ignore_index=0) of position t's logits against the label at t + 1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].flatten(), ignore_index=0)
