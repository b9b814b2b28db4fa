"""A re-statement of the official M2C training losses (LiJiaBei-7/TSCIR src/trainer.py `get_loss_img2text` and
`get_loss_img2text_stage2`, their `args.distributed and args.aggregate` branch: the one the release trains with),
kept as the parity oracle for tests; the product never uses it.

It works on the features the official functions compute (CLIP image features, the text features of the pseudo-word
sentences, the caption features) and follows the official arithmetic step by step: normalisation by division,
`softmax` then `log` for the KL, the hard negatives through `torch.gather` over an expanded feature tensor. With one
process the gathers are the identity. `fixed=True` applies the two intended corrections (gather the negatives, not
the positive; scale their logits by 1/t), the form our default training uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _contrastive(image, text, logit_scale):
    ground_truth = torch.arange(len(image))
    logits_per_image = logit_scale * image @ text.t()
    return (F.cross_entropy(logits_per_image, ground_truth) + F.cross_entropy(logits_per_image.t(), ground_truth)) / 2


def _kl(llm, text, image, logit_scale):
    p = torch.softmax(logit_scale * llm @ text.t(), dim=-1)
    q = torch.softmax(logit_scale * llm @ image.t(), dim=-1)
    return F.kl_div(torch.log(p), q, reduction="batchmean")


def official_stage1_loss(
    image_features,
    ref_image_features,
    text_features,
    llm_features,
    *,
    temperature=0.07,
    loss_consistency=0.2,
    loss_ref_txt=1.0,
) -> torch.Tensor:
    """image_features: view B (`images`); ref_image_features: view A (`images_strong`, the one Phi and VSI saw);
    text_features: "a photo of *"; llm_features: the captions."""
    image, ref_image = _unit(image_features), _unit(ref_image_features)
    text, llm = _unit(text_features), _unit(llm_features)
    logit_scale = 1.0 / temperature
    ground_truth = torch.arange(len(image))
    logits_per_image = logit_scale * image @ text.t()
    loss_img_val = F.cross_entropy(logits_per_image, ground_truth)
    loss_txt_val = F.cross_entropy(logits_per_image.t(), ground_truth)
    kl_loss = _kl(llm, text, image, logit_scale)
    loss_ref = _contrastive(ref_image, text, logit_scale) if loss_ref_txt > 0 else 0.0
    return (loss_img_val + loss_txt_val) / 2 + kl_loss * loss_consistency + loss_ref * loss_ref_txt


def official_stage2_loss(
    tgt_image_features,
    ref_image_features,
    text_features,
    text_features_map,
    ref_llm_features,
    *,
    temperature=0.01,
    topk=10,
    loss_consistency=0.2,
    fixed=False,
) -> torch.Tensor:
    """tgt / ref_image_features: CLIP features of the target / reference images; text_features: the composed
    query "a photo of * that {text}"; text_features_map: "a photo of *"; ref_llm_features: reference captions."""
    image, ref_image = _unit(tgt_image_features), _unit(ref_image_features)
    text, text_map, llm = _unit(text_features), _unit(text_features_map), _unit(ref_llm_features)
    logit_scale = 1.0 / temperature
    ground_truth = torch.arange(len(image))
    logits_per_image = logit_scale * image @ text.t()
    loss_img_val = F.cross_entropy(logits_per_image, ground_truth)
    logits_per_text = logits_per_image.t()

    bsz = len(logits_per_text)
    mask = torch.eye(bsz, dtype=torch.bool)
    top_values, top_indices = torch.topk(logits_per_text.masked_fill(mask, float("-inf")), topk, dim=1)
    sim = image @ image.t()
    min_vals, max_vals = sim.min(dim=1, keepdim=True).values, sim.max(dim=1, keepdim=True).values
    matrix_scaled = (sim - min_vals) / (max_vals - min_vals + 1e-8)
    mix_weight = torch.gather(matrix_scaled, dim=1, index=top_indices).unsqueeze(-1)
    if fixed:  # [i, j] = image j: the negatives themselves
        expanded = image.unsqueeze(0).expand(bsz, bsz, image.size(-1))
    else:  # as released: [i, j] = image i, so every gathered "negative" is row i's own target
        expanded = image.unsqueeze(1).expand(bsz, bsz, image.size(-1))
    indices = top_indices.unsqueeze(-1).expand(-1, -1, image.size(-1))
    negatives = torch.gather(expanded, 1, indices)
    mixed = mix_weight * image.unsqueeze(1) + (1.0 - mix_weight) * negatives
    mix_sim = torch.matmul(mixed, text.unsqueeze(-1)).squeeze(-1)
    if fixed:
        mix_sim = logit_scale * mix_sim
    loss_txt_val = F.cross_entropy(torch.cat([logits_per_text, mix_sim], dim=-1), ground_truth)

    loss_map = _contrastive(ref_image, text_map, logit_scale)
    kl_loss = _kl(llm, text_map, image, logit_scale)
    return (loss_img_val + loss_txt_val) / 2 + loss_map + kl_loss * loss_consistency
