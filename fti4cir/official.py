"""A straightforward re-statement of the official FTI4CIR code paths, kept as the parity oracle for tests and the
baseline for benchmarks; the product never uses it.

It does what the official code does, the slow way: the visual tower runs twice (`encode_image`, then again for the
patch tokens), filtering and token replacement loop over the batch, and every text pass uses the full 77-token
context. Module and attribute names follow the official ones so that `torch.save` of `OfficialIMG2TEXT` has the
official release structure (tests place these classes under the module names `i2t_model` / `MHTransformer`).
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .tokens import tokenize_prompts


class Phi(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, dropout):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x):
        return self.layers(x)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim, h_dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_dim, h_dim), F.relu, nn.Linear(h_dim, in_dim)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        h = self.num_heads
        q = self.to_queries(x).reshape(b, n, h, c // h)
        kv = self.to_keys_values(x).reshape(b, n, 2, h, c // h)
        scores = torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) * self.scale
        weights = scores.softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", weights, kv[:, :, 1]).reshape(b, n, c)), weights


class TransformerLayer(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), MultiHeadAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), MlpTransformer(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim, num_heads, num_layers, mlp_ratio=2.0):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class OfficialIMG2TEXT(nn.Module):
    """Same parameters and arithmetic as the official IMG2TEXT (its unused attention-mask code left out)."""

    def __init__(
        self,
        embed_dim,
        token_dim,
        patch_dim,
        num_k=24,
        topk=12,
        epsilon=0.05,
        tf_layer=3,
        tf_head=1,
        hy_regLoss=1.4,
        temperature=0.2,
    ):
        super().__init__()
        self.num_k, self.topk, self.epsilon = num_k, topk, epsilon
        self.hy_regLoss, self.temperature = hy_regLoss, temperature
        self.phi_s = Phi(embed_dim, embed_dim * 4, token_dim, 0.5)
        self.phi_a = Phi(embed_dim, embed_dim * 4, token_dim, 0.5)
        self.local_atte_fc = nn.Sequential(nn.Linear(patch_dim, embed_dim), nn.Sigmoid())
        self.cosine_criterion = nn.CosineEmbeddingLoss()
        self.ortho_loss = nn.MSELoss()
        self.transformer = Transformer(patch_dim, tf_head, tf_layer)
        self.templates = nn.Parameter(torch.randn(1, num_k, patch_dim))

    def latent_attributes(self, patch_tokens):
        queries = self.templates.expand(patch_tokens.shape[0], -1, -1)
        out = self.transformer(torch.cat([queries, patch_tokens], dim=1))[:, : self.num_k]
        return self.local_atte_fc(out)

    def select(self, global_feat, patch_tokens):
        """Per-sample loop, as in the official get_img_local_attr_feats."""
        latents = self.latent_attributes(patch_tokens)
        weights = F.softmax(torch.matmul(latents, global_feat.unsqueeze(2)).squeeze(2), dim=1)
        ranked = torch.argsort(weights, dim=1, descending=True)[:, : self.topk]
        rows, counts = [], []
        for i in range(latents.shape[0]):
            r = min(int((weights[i] > self.epsilon).sum()), self.topk)
            r = max(r, 1)
            order = torch.cat([torch.sort(ranked[i][:r]).values, ranked[i][r:]])
            rows.append(latents[i, order])
            counts.append(r)
        return F.normalize(torch.stack(rows), dim=-1), counts


def official_copy(net) -> OfficialIMG2TEXT:
    """An OfficialIMG2TEXT holding the same weights as our InversionNetwork `net` (eval mode)."""
    from .convert import official_to_ours  # convert imports the inversion module; keep this oracle light

    c = net.config
    official = OfficialIMG2TEXT(
        c.embed_dim,
        c.token_dim,
        c.patch_dim,
        c.num_k,
        c.topk,
        c.epsilon,
        c.tf_layers,
        c.tf_heads,
        c.reg_weight,
        c.temperature,
    ).eval()
    ours = net.state_dict()
    official.load_state_dict({name: ours[official_to_ours(name)] for name in official.state_dict()})
    return official


def official_patch_tokens(clip, images):
    """The official second visual pass: every block again, by hand, up to the last block's output."""
    visual = clip.visual
    x = visual._embeds(images)
    for block in visual.transformer.resblocks:
        x = block(x)
    return x


def official_replace_and_encode(clip, text_ids, subject, attributes, counts, mode):
    """The official token_replace: per-sample splicing into the 77-token sequence, then the full text tower.

    mode 0: subject at the first '*', then counts[i] attribute tokens after the next word ("with");
    mode 1: subject at the first '*'; mode 2: counts[i] attribute tokens from the first '*'."""
    from .tokens import EOT_ID, PLACEHOLDER_ID

    x = clip.token_embedding(text_ids)
    rows = []
    for i in range(x.shape[0]):
        first = int((text_ids[i] == PLACEHOLDER_ID).nonzero()[0])
        row = x[i]
        if mode in (0, 1):
            row = torch.cat([row[:first], subject[i : i + 1], row[first + 1 :]])
        if mode == 0:
            r = counts[i]
            row = torch.cat([row[: first + 2], attributes[i, :r], row[first + 2 + r :]])
        if mode == 2:
            r = counts[i]
            row = torch.cat([row[:first], attributes[i, :r], row[first + r :]])
        rows.append(row)
    x = torch.stack(rows) + clip.positional_embedding
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    eot = (text_ids == EOT_ID).nonzero()[:, 1]
    return x[torch.arange(x.shape[0]), eot] @ clip.text_projection


def official_compose(clip, net: OfficialIMG2TEXT, images, texts):
    """The official img_to_text: two visual passes, per-sample filtering and replacement, 77-token text."""
    with torch.no_grad():
        global_feat = clip.encode_image(images)
        patches = official_patch_tokens(clip, images)
        attrs, counts = net.select(global_feat, patches)
        subject, attr_tokens = net.phi_s(global_feat), net.phi_a(attrs)
        ids, _ = tokenize_prompts("a photo of * with {attrs}but {text}", [{"text": t} for t in texts], counts)
        return official_replace_and_encode(clip, ids, subject, attr_tokens, counts, 0)


# ---- the official training loss (src/utils.py + getLoss), re-stated literally -------------------------------------
def official_contrastive(v1, v2, temperature):
    """NT-Xent as the official code writes it."""
    v1, v2 = nn.functional.normalize(v1, dim=1), nn.functional.normalize(v2, dim=1)
    numerator = torch.exp(torch.diag(torch.inner(v1, v2)) / temperature)
    numerator = torch.cat((numerator, numerator), 0)
    joint = torch.cat((v1, v2), 0)
    pairs = torch.exp(torch.mm(joint, joint.t()) / temperature)
    denominator = torch.sum(pairs - pairs * torch.eye(joint.shape[0]), 0)
    return -torch.mean(torch.log(numerator / denominator))


def official_orthogonal(feats):
    """MSE between the attribute tokens' cosine matrix and the identity."""
    b, k, _ = feats.shape
    feats = nn.functional.normalize(feats, p=2, dim=-1)
    cos = torch.matmul(feats, feats.permute(0, 2, 1))
    return nn.MSELoss()(cos, torch.eye(k).unsqueeze(0).repeat(b, 1, 1))


def official_regularisation(clip, subject, attribute, whole, subj_token, attr_tokens, counts):
    """The tri-wise regularisation: caption feature vs subject-wise, attribute-wise and whole pseudo sentences."""
    cosine = nn.CosineEmbeddingLoss()
    target = torch.as_tensor([1])
    t_both = open_clip.tokenize([f"a photo of {s} with {a}" for s, a in zip(subject, attribute)])
    t_subj = open_clip.tokenize([f"a photo of * with {a}" for a in attribute])
    t_attr = open_clip.tokenize([f"a photo of {s} with {'* ' * r}" for s, r in zip(subject, counts)])
    with torch.no_grad():
        both = clip.encode_text(t_both)
    subj = official_replace_and_encode(clip, t_subj, subj_token, attr_tokens, counts, 1)
    attr = official_replace_and_encode(clip, t_attr, subj_token, attr_tokens, counts, 2)
    return cosine(both, subj, target) + cosine(both, attr, target) + cosine(both, whole, target)


def official_get_loss(clip, net, images, subject, attribute):
    """The official getLoss: two visual passes, per-sample selection, 77-token text with per-sample splicing."""
    with torch.no_grad():
        global_feat = clip.encode_image(images)
        patches = official_patch_tokens(clip, images)
    local, counts = net.select(global_feat, patches)
    subj_token, attr_tokens = net.phi_s(global_feat), net.phi_a(local)
    templates = open_clip.tokenize([f"a photo of * with {'* ' * r}" for r in counts])
    whole = official_replace_and_encode(clip, templates, subj_token, attr_tokens, counts, 0)
    contrastive = official_contrastive(global_feat, whole, net.temperature)
    orthogonal = official_orthogonal(local)
    reg = official_regularisation(clip, subject, attribute, whole, subj_token, attr_tokens, counts)
    return contrastive + orthogonal + net.hy_regLoss * reg, (contrastive, orthogonal, reg)
