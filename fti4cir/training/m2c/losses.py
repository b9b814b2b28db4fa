"""M2C training losses (official: LiJiaBei-7/TSCIR src/trainer.py). All features are L2-normalised by the caller.

Stage I : info_nce(query, image view B) + ref_weight * info_nce(query, image view A) + kl_weight * KL
Stage II: hard_negative_info_nce(query, target) + map_weight * info_nce(reference, mapping sentence) + kl_weight * KL
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned a [B, E] and b [B, E] (in-batch negatives)."""
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def soft_alignment_kl(
    captions: torch.Tensor, queries: torch.Tensor, images: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Soft text alignment KL(Q || P), batch mean: for each image's caption c_i, P_i = softmax_j(c_i . query_j / t)
    and Q_i = softmax_j(c_i . image_j / t) (the official `F.kl_div(log P, Q)`, in log space for stability)."""
    log_p = F.log_softmax(captions @ queries.t() / temperature, dim=-1)
    log_q = F.log_softmax(captions @ images.t() / temperature, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


def mixed_hard_negatives(
    queries: torch.Tensor, targets: torch.Tensor, topk: int, as_released: bool = False
) -> torch.Tensor:
    """Cosines [B, k] between each query and its k mixed hard negatives.

    The k non-target images with the highest query logits are each mixed with the query's target:
    w * v_target + (1 - w) * v_negative, where w is the target-negative cosine min-max scaled over the target's row of
    target-target cosines. k = min(topk, B - 1).

    as_released: the released gather (`torch.gather` over the target features expanded along dim 1) picks row i's
    own target for every negative, so each "mixed negative" is the positive itself: its cosine repeated k times."""
    b = queries.shape[0]
    k = min(topk, b - 1)
    if as_released:
        return (queries * targets).sum(dim=-1, keepdim=True).expand(b, k)
    eye = torch.eye(b, dtype=torch.bool, device=queries.device)
    negatives = (queries @ targets.t()).masked_fill(eye, float("-inf")).topk(k, dim=1).indices  # [B, k]
    similarity = targets @ targets.t()
    low, high = similarity.min(dim=1, keepdim=True).values, similarity.max(dim=1, keepdim=True).values
    weight = ((similarity - low) / (high - low + 1e-8)).gather(1, negatives).unsqueeze(-1)  # [B, k, 1]
    mixed = weight * targets.unsqueeze(1) + (1 - weight) * targets[negatives]  # [B, k, E]
    return (mixed * queries.unsqueeze(1)).sum(dim=-1)


def hard_negative_info_nce(
    queries: torch.Tensor, targets: torch.Tensor, temperature: float, topk: int = 10, as_released: bool = False
) -> torch.Tensor:
    """Stage II composing loss: symmetric InfoNCE between queries and target images; the query->target direction
    also sees the mixed hard negatives. Their logits are scaled by 1/t like all others; as_released: the released
    code's negatives (the positive itself, see `mixed_hard_negatives`) appended unscaled (cosines in [-1, 1] beside
    logits in [-100, 100])."""
    logits = queries @ targets.t() / temperature
    target = torch.arange(queries.shape[0], device=queries.device)
    image_to_text = F.cross_entropy(logits.t(), target)
    if queries.shape[0] > 1:
        mixed = mixed_hard_negatives(queries, targets, topk, as_released)
        logits = torch.cat([logits, mixed if as_released else mixed / temperature], dim=1)
    return (image_to_text + F.cross_entropy(logits, target)) / 2


@dataclass
class LossTerms:
    total: torch.Tensor
    contrastive: torch.Tensor  # stage I: query vs view B; stage II: query vs target (with hard negatives)
    anchor: torch.Tensor  # stage I: query vs view A; stage II: mapping sentence vs reference
    kl: torch.Tensor

    def detached(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def stage1_loss(
    query: torch.Tensor,
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    captions: torch.Tensor | None,
    *,
    temperature: float = 0.07,
    ref_weight: float = 1.0,
    kl_weight: float = 0.2,
) -> LossTerms:
    """query: "a photo of *" features of view A; view_a / view_b: image features of the two augmented views;
    captions: text features of the images' captions (None: no KL term)."""
    contrastive = info_nce(query, view_b, temperature)
    anchor = info_nce(query, view_a, temperature)
    kl = (
        soft_alignment_kl(captions, query, view_b, temperature)
        if captions is not None and kl_weight
        else query.new_zeros(())
    )
    return LossTerms(contrastive + ref_weight * anchor + kl_weight * kl, contrastive, anchor, kl)


def stage2_loss(
    query: torch.Tensor,
    mapping: torch.Tensor,
    reference: torch.Tensor,
    target: torch.Tensor,
    captions: torch.Tensor | None,
    *,
    temperature: float = 0.01,
    topk: int = 10,
    map_weight: float = 1.0,
    kl_weight: float = 0.2,
    as_released: bool = False,
) -> LossTerms:
    """query: composed features ("a photo of * that {text}", adapters on); mapping: "a photo of *" features (adapters
    on); reference / target: image features; captions: reference caption features (None: no KL term).

    The KL term compares the reference caption's distribution over the mapping sentences with its distribution over
    the target images, as the official `get_loss_img2text_stage2`. as_released: the released hard negatives (see
    `hard_negative_info_nce`)."""
    contrastive = hard_negative_info_nce(query, target, temperature, topk, as_released)
    anchor = info_nce(reference, mapping, temperature)
    kl = (
        soft_alignment_kl(captions, mapping, target, temperature)
        if captions is not None and kl_weight
        else query.new_zeros(())
    )
    return LossTerms(contrastive + map_weight * anchor + kl_weight * kl, contrastive, anchor, kl)
