"""M2C, "From Mapping to Composing" (arXiv 2504.17990): networks, the hooked text encoder, the query path, weights.

Beside FTI4CIR on the same frozen backbone. Stage I (mapping): Phi maps the global image feature to one pseudo-word
token for "a photo of *"; after given text resblocks, visual semantic injection (VSI) adds a residual update, computed
from the image's patch tokens, to the hidden state at the `*` position. Stage II (composing): low-rank composing
adapters `x <- x + x A B` after given text resblocks, on every token; everything of stage I stays frozen.

Behaviour follows the official code (LiJiaBei-7/TSCIR, model/model.py `IM2TEXT`, `Adapter`, `LoRALayer` and
`encode_text_img_retrieval`; model/module.py `CrossAttention`); names and layout are ours. Notes on it:
- M2C's patch tokens are the visual tower's tokens AFTER `ln_post` and `proj` (FTI4CIR uses them before); they are
  computed here from the same single visual pass (`Backbone.encode_visual`), CLS dropped, and mapped by a Linear into
  the text width before VSI.
- A VSI hook after the text tower's last block changes only the `*` position after the last attention, so it cannot
  reach the EOS feature; the official default layers {3, 7, 9, 11} include this no-op hook (kept for parity).
- The official MLPs are [Linear, Dropout, ReLU] x 2, the output MLP included, so the VSI update is non-negative.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import PIL.Image
import torch
from torch import nn

from ..backbone import Backbone, VisualFeatures
from ..config_checks import M2C_RELATIONS, M2C_RULES, check_fields
from ..errors import UserError
from ..model import BackboneModel
from ..queries import Composed, any_variant, average_text_variants, split_text_variants
from ..tokens import tokenize_prompts
from ..weightfiles import build_network, read_config, save_weights

FORMAT_VERSION = 1
METHOD = "m2c"
CONFIG_KEY = "m2c_config"
REFERENCE_DEPTH = 12  # the default hook layers are given for a 12-block text tower (ViT-B/L CLIP)
DEFAULT_VSI_LAYERS = (3, 7, 9, 11)
DEFAULT_ADAPTER_LAYERS = (1, 3, 5, 7, 9, 11)
DEFAULT_ADAPTER_RANK = 128

# The sentence of stage I (and of the mapping term of stage II).
MAPPING_PROMPT = "a photo of *"
# Query prompts per dataset, as the official evaluation writes them ('*' stays a separate word: ", that" is fine).
PROMPTS = {
    "default": "a photo of * that {text}",
    "fashioniq": "a photo of * , that {text}",
    "cirr": "a photo of * , that {text}",
    "circo": "a photo of * that {text}",
}

Reference = torch.Tensor | VisualFeatures | Sequence[PIL.Image.Image]
Text = str | tuple[str, ...]


def fashioniq_text(caption1: str, caption2: str) -> str:
    """The official M2C FashionIQ text: the two captions as given, second one first ("{cap2} and {cap1}"), one order
    only (unlike FTI4CIR's two-order average)."""
    return f"{caption2} and {caption1}"


# ---- configuration ------------------------------------------------------------------------------------------------
def scale_layers(layers: Sequence[int], depth: int, reference: int = REFERENCE_DEPTH) -> tuple[int, ...]:
    """Hook layers given for a `reference`-block tower, moved to the same relative depth of a `depth`-block tower:
    block j (0-based) -> ceil((j + 1) * depth / reference) - 1, duplicates merged. Identity when depth == reference;
    for the 2-block tiny tower both defaults become (0, 1)."""
    return tuple(sorted({math.ceil((j + 1) * depth / reference) - 1 for j in layers}))


def check_layers(layers: Sequence[int], depth: int, what: str) -> tuple[int, ...]:
    layers = tuple(sorted({int(j) for j in layers}))
    bad = [j for j in layers if not 0 <= j < depth]
    if bad:
        raise UserError(f"{what} layers {bad} do not exist: the text tower has blocks 0..{depth - 1}")
    return layers


@dataclass
class M2CConfig:
    """Dimensions and hyper-parameters (official defaults) of the M2C networks."""

    embed_dim: int  # CLIP joint space: Phi's input, patch tokens after proj
    token_dim: int  # text transformer width: the pseudo token, VSI and adapters live here
    text_layers: int  # blocks of the text tower (hook layers index them, 0-based)
    grid: tuple[int, int]  # patch grid of the visual tower
    middle_dim: int = 512
    dropout: float = 0.1
    vsi_dim: int = 128
    vsi_heads: int = 8
    vsi_depth: int = 2  # cross-attention layers per VSI module
    vsi_layers: tuple[int, ...] = DEFAULT_VSI_LAYERS
    adapter_layers: tuple[int, ...] = ()  # empty: a stage-I network (no composing adapters)
    adapter_rank: int = DEFAULT_ADAPTER_RANK
    backbone: str = ""
    pretrained: str = ""
    method: str = METHOD
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        self.vsi_layers = check_layers(self.vsi_layers, self.text_layers, "VSI")
        self.adapter_layers = check_layers(self.adapter_layers, self.text_layers, "Adapter")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("grid", "vsi_layers", "adapter_layers"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> M2CConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown config keys: {sorted(unknown)}")
        if d.get("method", METHOD) != METHOD:
            raise ValueError(f"not an M2C config (method {d.get('method')!r})")
        check_fields(cls, d, M2C_RULES, "M2C", M2C_RELATIONS)  # types, ranges, finiteness (fti4cir.config_checks)
        return cls(**d)

    @classmethod
    def for_backbone(cls, backbone: Backbone, *, vsi_layers: Sequence[int] | None = None, **overrides) -> M2CConfig:
        """vsi_layers=None: the official layers moved to this tower's depth (`scale_layers`)."""
        depth = len(backbone.clip.transformer.resblocks)
        if vsi_layers is None:
            vsi_layers = scale_layers(DEFAULT_VSI_LAYERS, depth)
        return cls(
            embed_dim=backbone.embed_dim,
            token_dim=backbone.token_dim,
            text_layers=depth,
            grid=backbone.grid_size,
            vsi_layers=tuple(vsi_layers),
            backbone=backbone.name,
            pretrained=str(backbone.pretrained),
            **overrides,
        )


# ---- networks -----------------------------------------------------------------------------------------------------
def _mlp(in_dim: int, out_dim: int, dropout: float, depth: int = 2) -> nn.Sequential:
    """The official MLP: [Linear, Dropout, ReLU] x depth (it ends in a ReLU)."""
    layers = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else out_dim, out_dim), nn.Dropout(dropout), nn.ReLU()]
    return nn.Sequential(*layers)


class Mapper(nn.Module):
    """Phi: global image feature [B, E] -> one pseudo-word token [B, token_dim]."""

    def __init__(self, embed_dim: int, middle_dim: int, token_dim: int, dropout: float):
        super().__init__()
        self.hidden = _mlp(embed_dim, middle_dim, dropout)
        self.out = nn.Linear(middle_dim, token_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(image_features))


class CrossAttentionLayer(nn.Module):
    """query <- LayerNorm(query + FFN(attention(query + query_pos, patches))), as the official layer: the FFN
    (d -> d, GELU) acts on the attention output and the residual skips both."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(query + query_pos, memory, memory, need_weights=False)
        return self.norm(query + self.dropout(self.ffn(attended)))


class VisualSemanticInjection(nn.Module):
    """Residual update of the `*` hidden state from the patch tokens (one module per hooked block)."""

    def __init__(self, width: int, dim: int, heads: int, depth: int, dropout: float):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.query_in = _mlp(width, dim, dropout)
        self.patch_in = _mlp(width, dim, dropout)
        self.position_in = _mlp(width, dim, dropout)  # from the EOS hidden state: the query's positional term
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, heads, dropout) for _ in range(depth))
        self.out = _mlp(dim, width, dropout)

    def memory(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """patches [B, gh*gw, W] in text width (CLS dropped) -> keys/values [B, gh*gw, dim]; the costly image side."""
        b, _, w = patches.shape
        on_grid = patches.transpose(1, 2).reshape(b, w, *grid)
        return self.patch_in(self.conv(on_grid).flatten(2).transpose(1, 2))

    def forward(self, star: torch.Tensor, eos: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """star, eos: [B, W] hidden states; memory: `self.memory(patches)` -> update [B, W]."""
        query, position = self.query_in(star).unsqueeze(1), self.position_in(eos).unsqueeze(1)
        for layer in self.layers:
            query = layer(query, memory, position)
        return self.out(query.squeeze(1))


class ComposingAdapter(nn.Module):
    """x <- x + x A B on every token (the official `LoRALayer`, same init)."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.randn(width, rank) * 0.01)
        self.up = nn.Parameter(torch.randn(rank, width) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (x @ self.down) @ self.up


class M2CNetwork(nn.Module):
    """The trained part of M2C: Phi, the patch projection, the VSI modules and (stage II) the composing adapters."""

    def __init__(self, config: M2CConfig):
        super().__init__()
        c = self.config = config
        self.mapper = Mapper(c.embed_dim, c.middle_dim, c.token_dim, c.dropout)
        self.patch_proj = nn.Linear(c.embed_dim, c.token_dim)
        self.vsi = nn.ModuleList(
            VisualSemanticInjection(c.token_dim, c.vsi_dim, c.vsi_heads, c.vsi_depth, c.dropout) for _ in c.vsi_layers
        )
        self.adapters = nn.ModuleList(ComposingAdapter(c.token_dim, c.adapter_rank) for _ in c.adapter_layers)

    @property
    def has_adapters(self) -> bool:
        return len(self.adapters) > 0

    def add_adapters(self, layers: Sequence[int] | None = None, rank: int = DEFAULT_ADAPTER_RANK) -> None:
        """Start stage II: new composing adapters after `layers` (None: the official layers at this depth)."""
        if self.has_adapters:
            raise UserError("These M2C weights already have composing adapters (stage II is done)")
        c = self.config
        layers = scale_layers(DEFAULT_ADAPTER_LAYERS, c.text_layers) if layers is None else layers
        c.adapter_layers, c.adapter_rank = check_layers(layers, c.text_layers, "Adapter"), int(rank)
        device = self.patch_proj.weight.device
        self.adapters = nn.ModuleList(ComposingAdapter(c.token_dim, c.adapter_rank) for _ in c.adapter_layers)
        self.adapters.to(device)


# ---- the model: backbone + network + transform --------------------------------------------------------------------
def projected_patch_tokens(backbone: Backbone, patch_tokens: torch.Tensor) -> torch.Tensor:
    """FTI4CIR-style tokens (last block output, before ln_post) -> M2C's tokens: ln_post, then proj."""
    visual = backbone.clip.visual
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise UserError(f"M2C needs a plain ViT visual tower (ln_post on every token); {backbone.name} pools otherwise")
    tokens = visual.ln_post(patch_tokens.to(backbone.dtype))
    return tokens @ visual.proj if visual.proj is not None else tokens


class M2CModel(BackboneModel):
    """Frozen backbone + `M2CNetwork` + image transform: the object the query path, training and the app use."""

    def __init__(self, backbone: Backbone, net: M2CNetwork, preprocess: str = "clip"):
        c = net.config
        made_for = (c.embed_dim, c.token_dim, c.text_layers, c.grid)
        if made_for != (
            backbone.embed_dim,
            backbone.token_dim,
            len(backbone.clip.transformer.resblocks),
            tuple(backbone.grid_size),
        ):
            raise UserError(
                f"M2C weights were made for backbone '{c.backbone}' (embed {c.embed_dim}, text width "
                f"{c.token_dim}, {c.text_layers} text blocks, patch grid {c.grid}), not for "
                f"'{backbone.name}'; pass the matching --backbone"
            )
        super().__init__(backbone, preprocess)
        self.net = net.to(backbone.device)

    @property
    def config(self) -> M2CConfig:
        return self.net.config

    def visual_inputs(self, references: Reference) -> tuple[torch.Tensor, torch.Tensor]:
        """(global features [B, E], patch tokens in text width [B, g*g, W]) from PIL images, preprocessed images or
        `VisualFeatures` (the core's one-pass features, tokens before ln_post)."""
        if not isinstance(references, (torch.Tensor, VisualFeatures)):
            references = self.preprocess(list(references))
        if isinstance(references, torch.Tensor):
            references = self.backbone.encode_visual(references)
        tokens = projected_patch_tokens(self.backbone, references.patch_tokens.to(self.device))
        patches = self.net.patch_proj(tokens[:, 1:].float())
        return references.global_features.to(self.device).float(), patches

    def encode(
        self,
        template: str,
        texts: Sequence[str] | None,
        image_features: torch.Tensor,
        patches: torch.Tensor,
        *,
        use_adapters: bool,
    ) -> torch.Tensor:
        """Text features [B, E] (not normalised) of `template` with `*` = Phi(image) and VSI / adapters hooked in.
        texts: one `{text}` value per row (None for templates without fields, e.g. `MAPPING_PROMPT`)."""
        return self.encode_prompt(template, texts, image_features, patches, use_adapters=use_adapters)[0]

    def encode_prompt(
        self,
        template: str,
        texts: Sequence[str] | None,
        image_features: torch.Tensor,
        patches: torch.Tensor,
        *,
        use_adapters: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode`, and which rows' text was cut to fit CLIP's context ([B] bool)."""
        fields = [{}] * image_features.shape[0] if texts is None else [{"text": t} for t in texts]
        ids, mask = tokenized = tokenize_prompts(template, fields, None, self.backbone.context_length)
        if not bool((mask.sum(dim=1) == 1).all()):
            raise UserError(f"An M2C prompt needs exactly one '*' placeholder: {template!r}")
        features = self.encode_tokens(ids, mask, self.net.mapper(image_features), patches, use_adapters=use_adapters)
        return features, tokenized.truncated

    def encode_tokens(
        self,
        token_ids: torch.Tensor,
        placeholder_mask: torch.Tensor,
        pseudo: torch.Tensor,
        patches: torch.Tensor | None,
        *,
        use_adapters: bool,
    ) -> torch.Tensor:
        """CLIP's text tower run block by block. After block j: VSI when j is a VSI layer (needs `patches`), then the
        composing adapter when j is an adapter layer and `use_adapters`. With neither it equals
        `Backbone.encode_tokens` exactly. Context truncated to the longest sequence: exact, as the mask is causal
        and every hook is token-wise or reads positions up to EOS.

        patches: [B, g*g, W], or [B / k, g*g, W] when the batch is k prompts stacked over the same references (the
        image side of VSI is then computed once and tiled)."""
        if use_adapters and not self.net.has_adapters:
            raise UserError("These M2C weights have no composing adapters (stage I only): use method 'm2c'")
        clip = self.backbone.clip
        token_ids = token_ids.to(self.device)
        eos = (token_ids == self.backbone.eot_id).int().argmax(dim=1)
        length = int(eos.max()) + 1
        token_ids, mask = token_ids[:, :length], placeholder_mask[:, :length].to(self.device)
        star = mask.int().argmax(dim=1)
        rows = torch.arange(token_ids.shape[0], device=self.device)
        x = clip.token_embedding(token_ids)
        x = torch.where(mask.unsqueeze(-1), pseudo.to(x.dtype).unsqueeze(1), x)
        x = x + clip.positional_embedding[:length].to(x.dtype)
        attn_mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        batch_first = getattr(clip.transformer, "batch_first", True)
        vsi = dict(zip(self.config.vsi_layers, self.net.vsi))
        adapters = dict(zip(self.config.adapter_layers, self.net.adapters)) if use_adapters else {}
        tiles = 1
        if vsi:
            if patches is None or token_ids.shape[0] % patches.shape[0]:
                raise ValueError("VSI needs patch tokens for every row (or for every row of each stacked prompt)")
            tiles = token_ids.shape[0] // patches.shape[0]
        for j, block in enumerate(clip.transformer.resblocks):
            x = (
                block(x, attn_mask=attn_mask)
                if batch_first
                else block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
            )
            if j in vsi:
                memory = vsi[j].memory(patches, self.config.grid).repeat(tiles, 1, 1)
                update = vsi[j](x[rows, star], x[rows, eos], memory)
                x = torch.where(mask.unsqueeze(-1), x + update.unsqueeze(1).to(x.dtype), x)
            if j in adapters:
                x = adapters[j](x)
        x = clip.ln_final(x)
        return x[rows, eos] @ clip.text_projection


def m2c_compose(
    m2c_model: M2CModel,
    references: Reference,
    texts: Sequence[Text],
    *,
    prompt: str | None = None,
    use_adapters: bool | None = None,
) -> torch.Tensor:
    """M2C query features [B, embed_dim], L2-normalised; differentiable (wrap inference in torch.no_grad()).

    references: PIL images, preprocessed image tensors [B, 3, H, W] or `VisualFeatures` (as for `compose`).
    texts: one modification text per reference, or a tuple of variants per reference (features averaged).
    prompt: template with one '*' and a `{text}` field (default `PROMPTS["default"]`; per dataset: `PROMPTS`).
    use_adapters: the composing adapters of stage II (method "m2c+compose") or not (method "m2c", the stage-I
        query); None: whenever the weights have them.
    """
    return m2c_query(m2c_model, references, texts, prompt=prompt, use_adapters=use_adapters).features


def m2c_query(
    m2c_model: M2CModel,
    references: Reference,
    texts: Sequence[Text],
    *,
    prompt: str | None = None,
    use_adapters: bool | None = None,
) -> Composed:
    """`m2c_compose`, with which references' texts were cut to fit CLIP's context."""
    if use_adapters is None:
        use_adapters = m2c_model.net.has_adapters
    flat, n = split_text_variants(texts)
    image_features, patches = m2c_model.visual_inputs(references)
    if n > 1:
        image_features, patches = image_features.repeat_interleave(n, 0), patches.repeat_interleave(n, 0)
    features, truncated = m2c_model.encode_prompt(
        prompt or PROMPTS["default"], flat, image_features, patches, use_adapters=use_adapters
    )
    return Composed(average_text_variants(features, n), any_variant(truncated, n))


# ---- weights ------------------------------------------------------------------------------------------------------
def save_m2c_weights(net: M2CNetwork, path: str | os.PathLike) -> Path:
    """`path` (.safetensors, config also in its metadata) and the config beside it as `<stem>.json`."""
    return save_weights(net, path, CONFIG_KEY)


def _read_m2c_config(path: Path) -> M2CConfig:
    config = read_config(path, CONFIG_KEY, "M2C")
    try:
        return M2CConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path.name} is not an M2C weights file: {e}") from e


def is_m2c_weights(path: str | os.PathLike) -> bool:
    """Whether `path` is one of our M2C weights files (its JSON config says method "m2c")."""
    try:
        _read_m2c_config(Path(path))
        return True
    except (UserError, OSError):
        return False


def read_m2c_config(path: str | os.PathLike) -> M2CConfig:
    """The config of an M2C weights file (cheap: no tensors are read); UserError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"M2C weights file not found: {path}"
            if not path.exists()
            else f"M2C weights must be a .safetensors file, not {path}"
        )
    return _read_m2c_config(path)


def load_m2c_weights(path: str | os.PathLike) -> M2CNetwork:
    return build_network(M2CNetwork, read_m2c_config(path), Path(path))
