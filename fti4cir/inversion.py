"""The FTI4CIR inversion network: visual features -> subject and attribute pseudo-word tokens.

Behaviour matches the official `IMG2TEXT` (ZiChao111/FTI4CIR, src/i2t_model.py + src/MHTransformer.py); parameter
names differ and are mapped by `fti4cir.convert`. Batched throughout (the official filtering loops over the batch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config_checks import INVERSION_RELATIONS, INVERSION_RULES, check_fields

FORMAT_VERSION = 1


@dataclass
class InversionConfig:
    """Dimensions and hyper-parameters (official defaults) of the inversion network and its training."""

    embed_dim: int  # CLIP joint space (input of both mappers; the attribute latents live here too)
    token_dim: int  # CLIP token embedding width (output of the mappers)
    patch_dim: int  # visual transformer width (patch tokens, learned queries)
    num_k: int = 24  # learned attribute queries
    topk: int = 12  # at most this many attribute tokens are kept
    epsilon: float = 0.05  # relevance threshold for keeping an attribute
    tf_layers: int = 3
    tf_heads: int = 1
    mlp_ratio: float = 2.0
    dropout: float = 0.5  # in the mappers
    temperature: float = 0.2  # NT-Xent
    reg_weight: float = 1.4  # tri-wise regularisation weight
    # weight of the subject-wise sentence inside the tri-wise regularisation (official: 1, the three sentences alike)
    subject_weight: float = 1.0
    backbone: str = ""  # open_clip model name the network was trained with
    pretrained: str = ""  # pretrained tag / source of the backbone
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InversionConfig:
        """The config read from a file, every value checked (types, ranges, finiteness); ValueError otherwise."""
        return cls(**check_fields(cls, d, INVERSION_RULES, "FTI4CIR", INVERSION_RELATIONS))

    @classmethod
    def for_backbone(cls, backbone, **overrides) -> InversionConfig:
        return cls(
            embed_dim=backbone.embed_dim,
            token_dim=backbone.token_dim,
            patch_dim=backbone.patch_dim,
            backbone=backbone.name,
            pretrained=str(backbone.pretrained),
            **overrides,
        )


class TokenMapper(nn.Sequential):
    """phi: Linear -> GELU -> Dropout -> Linear -> GELU -> Dropout -> Linear (hidden = 4 x input)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        hidden = 4 * in_dim
        super().__init__(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )


class QueryAttention(nn.Module):
    """Multi-head self-attention as in the official MHTransformer: no q/k/v bias, a biased output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention outputs for the first `num_rows` tokens (all by default), keys and values from every token."""
        b, n, c = x.shape
        h = self.heads
        m = n if num_rows is None else num_rows
        q = self.q_proj(x[:, :m]).view(b, m, h, c // h).transpose(1, 2)  # [b, h, m, d]
        k, v = self.kv_proj(x).view(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)  # 2 x [b, h, n, d]
        attn = ((q @ k.transpose(-1, -2)) * self.scale).softmax(dim=-1)  # [b, h, m, n]
        out = (attn @ v).transpose(1, 2).reshape(b, m, c)
        return self.out_proj(out), attn


class QueryBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = QueryAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x, num_rows: int | None = None):
        """Outputs for the first `num_rows` tokens (all by default); every token still serves as key and value."""
        y, attn = self.attn(self.norm1(x), num_rows)
        x = x[:, : y.shape[1]] + y
        return x + self.mlp(self.norm2(x)), attn


@dataclass
class AttributeSelection:
    features: torch.Tensor  # [B, topk, embed_dim] L2-normalised: kept (query order), then the next most relevant
    num_kept: torch.Tensor  # [B] r, in [1, topk]
    indices: torch.Tensor  # [B, topk] query index of each row of `features`
    relevance: torch.Tensor  # [B, num_k] softmax over queries of latent . global feature
    attention: list[torch.Tensor] | None = None  # per layer [B, heads, num_k, num_k + 1 + grid**2] (query rows)


@dataclass
class PseudoTokens:
    """Everything the text side needs about a batch of reference images (cacheable per image)."""

    subject: torch.Tensor  # [B, token_dim]
    attributes: torch.Tensor  # [B, topk, token_dim]; the first num_kept rows are used
    num_kept: torch.Tensor  # [B]
    image_features: torch.Tensor  # [B, embed_dim] global CLIP feature (not normalised)
    selection: AttributeSelection | None = None

    def to(self, device) -> PseudoTokens:
        return PseudoTokens(
            self.subject.to(device),
            self.attributes.to(device),
            self.num_kept.to(device),
            self.image_features.to(device),
            self.selection,
        )

    def __len__(self) -> int:
        return self.subject.shape[0]

    def __getitem__(self, idx) -> PseudoTokens:
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.subject.device).reshape(-1)
        return PseudoTokens(self.subject[idx], self.attributes[idx], self.num_kept[idx], self.image_features[idx])

    @staticmethod
    def cat(items: list[PseudoTokens]) -> PseudoTokens:
        return PseudoTokens(
            *(
                torch.cat([getattr(p, f) for p in items])
                for f in ("subject", "attributes", "num_kept", "image_features")
            )
        )


class InversionNetwork(nn.Module):
    """FTI4CIR's fine-grained textual inversion (the official IMG2TEXT)."""

    def __init__(self, config: InversionConfig):
        super().__init__()
        c = self.config = config
        self.subject_mapper = TokenMapper(c.embed_dim, c.token_dim, c.dropout)  # official phi_s
        self.attribute_mapper = TokenMapper(c.embed_dim, c.token_dim, c.dropout)  # official phi_a
        self.attribute_queries = nn.Parameter(torch.randn(1, c.num_k, c.patch_dim))  # official templates
        self.attribute_encoder = nn.ModuleList(
            QueryBlock(c.patch_dim, c.tf_heads, c.mlp_ratio) for _ in range(c.tf_layers)
        )
        self.attribute_head = nn.Sequential(nn.Linear(c.patch_dim, c.embed_dim), nn.Sigmoid())  # local_atte_fc

    def attribute_latents(self, patch_tokens: torch.Tensor, return_attention: bool = False):
        """The num_k learned queries attend jointly with the patch tokens; their outputs are the attribute latents."""
        b = patch_tokens.shape[0]
        x = torch.cat([self.attribute_queries.expand(b, -1, -1).to(patch_tokens.dtype), patch_tokens], dim=1)
        k = self.config.num_k
        maps = []
        last = len(self.attribute_encoder) - 1
        for i, block in enumerate(self.attribute_encoder):
            # only the query rows are read after the last block: skip its patch rows (exact; ~1/3 of the network)
            x, attn = block(x, num_rows=k if i == last else None)
            if return_attention:
                maps.append(attn[:, :, :k].detach())
        return self.attribute_head(x[:, :k]), (maps if return_attention else None)

    def select_attributes(
        self, global_features: torch.Tensor, patch_tokens: torch.Tensor, return_attention: bool = False
    ) -> AttributeSelection:
        """Local-global relevance filtering, batched.

        relevance = softmax over queries of (latent . global feature); r = #(relevance > epsilon) clipped to
        [1, topk]. Rows: the r most relevant in their original query order, then the rest of the topk most relevant
        by relevance (those rows feed only the orthogonality loss).
        """
        c = self.config
        latents, maps = self.attribute_latents(patch_tokens, return_attention)
        relevance = torch.softmax((latents @ global_features.unsqueeze(-1).to(latents.dtype)).squeeze(-1), dim=1)
        ranked = torch.argsort(relevance, dim=1, descending=True, stable=True)[:, : c.topk]
        num_kept = (relevance > c.epsilon).sum(dim=1).clamp(1, c.topk)
        position = torch.arange(c.topk, device=ranked.device).expand_as(ranked)
        kept = position < num_kept.unsqueeze(1)
        # kept rows sort by query index (< num_k); the others keep their rank order after them
        order = torch.argsort(torch.where(kept, ranked, c.num_k + position), dim=1)
        indices = ranked.gather(1, order)
        selected = latents.gather(1, indices.unsqueeze(-1).expand(-1, -1, latents.shape[-1]))
        return AttributeSelection(F.normalize(selected, dim=-1), num_kept, indices, relevance, maps)

    def forward(
        self, global_features: torch.Tensor, patch_tokens: torch.Tensor, return_attention: bool = False
    ) -> PseudoTokens:
        selection = self.select_attributes(global_features, patch_tokens, return_attention)
        subject = self.subject_mapper(global_features.to(selection.features.dtype))
        attributes = self.attribute_mapper(selection.features)
        return PseudoTokens(subject, attributes, selection.num_kept, global_features, selection)
