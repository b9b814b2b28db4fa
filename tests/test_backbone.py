import time

import open_clip
import pytest
import torch

from fti4cir import load_backbone
from fti4cir.backbone import BackboneUnavailable
from fti4cir.official import official_patch_tokens
from fti4cir.tokens import tokenize_plain


def test_tiny_config_is_registered_and_fast():
    assert "fti4cir-tiny" in open_clip.list_models()
    start = time.perf_counter()
    backbone = load_backbone("fti4cir-tiny", None, "cpu")
    assert time.perf_counter() - start < 1.0
    assert (backbone.embed_dim, backbone.token_dim, backbone.patch_dim) == (64, 64, 96)
    assert backbone.clip.token_embedding.num_embeddings == 49408
    assert backbone.placeholder_id == 265


def test_one_visual_pass_gives_encode_image_and_official_patch_tokens(tiny_backbone, images):
    features = tiny_backbone.encode_visual(images)
    grid = tiny_backbone.grid_size
    assert features.patch_tokens.shape == (4, 1 + grid[0] * grid[1], tiny_backbone.patch_dim)
    torch.testing.assert_close(features.global_features, tiny_backbone.clip.encode_image(images))
    with torch.no_grad():
        torch.testing.assert_close(features.patch_tokens, official_patch_tokens(tiny_backbone.clip, images))


def test_truncated_context_equals_full_context(tiny_backbone):
    texts = ["a red dress", "a photo of a cat sitting on a very long wooden bench in the park", "x"]
    ids = tokenize_plain(tiny_backbone, texts)
    with torch.no_grad():
        short = tiny_backbone.encode_tokens(ids, truncate_context=True)
        full = tiny_backbone.encode_tokens(ids, truncate_context=False)
        reference = tiny_backbone.clip.encode_text(open_clip.tokenize(texts))
    assert (short - full).abs().max() <= 1e-5
    assert (short - reference).abs().max() <= 1e-5


def test_offline_pretrained_tag_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(BackboneUnavailable) as err:
        load_backbone("ViT-B-32", "openai", "cpu", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 30
    message = str(err.value)
    assert "ViT-B-32/openai" in message and "Tried" in message and "--pretrained /path/to/" in message


def test_unknown_tag_and_bad_file_are_user_errors(tmp_path):
    from fti4cir.errors import UserError

    with pytest.raises(UserError, match="neither a file nor a pretrained tag"):
        load_backbone("fti4cir-tiny", "no-such-tag", "cpu")
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneUnavailable, match="broken.pt"):
        load_backbone("fti4cir-tiny", str(bad), "cpu")


def test_openai_format_state_dict_matches_open_clip_openai_loader(tmp_path, images):
    """A state dict named as clip.model.CLIP.state_dict() names it loads into our backbone with the same outputs as
    open_clip's own OpenAI loader."""
    torch.manual_seed(3)
    source = open_clip.create_model("fti4cir-tiny", pretrained=None)
    for p in source.parameters():  # realistic scale; norms and biases moved off their init values too
        if p.ndim <= 1:
            p.data.add_(torch.randn_like(p) * 0.02)
    # OpenAI's files hold fp16 weights (its loader rounds to fp16 whatever it is given)
    state = {k: v.half() for k, v in source.state_dict().items()}
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state and "token_embedding.weight" in state
    path = tmp_path / "tiny-openai.pt"
    torch.save(state, path)

    ours = load_backbone("fti4cir-tiny", str(path), "cpu", quick_gelu=True)
    reference = open_clip.load_openai_model(str(path), device="cpu", precision="fp32").eval()
    texts = ["a photo of a dog", "red shoes"]
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours.encode_text(texts), reference.encode_text(open_clip.tokenize(texts)), atol=1e-5, rtol=1e-5
        )
