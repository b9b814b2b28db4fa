"""M2C ("From Mapping to Composing"): networks, hooked text encoder, query path, weights, losses, triplets, training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from conftest import run_subcommand, shared_data
from fti4cir import InversionConfig, InversionNetwork, save_weights
from fti4cir.commands import m2c_train as m2c_train_command
from fti4cir.commands import triplets as triplets_command
from fti4cir.errors import UserError
from fti4cir.features import FeatureStore
from fti4cir.imagefiles import list_images
from fti4cir.m2c.model import (
    DEFAULT_ADAPTER_LAYERS,
    DEFAULT_VSI_LAYERS,
    PROMPTS,
    M2CConfig,
    M2CModel,
    M2CNetwork,
    fashioniq_text,
    is_m2c_weights,
    load_m2c_weights,
    m2c_compose,
    projected_patch_tokens,
    save_m2c_weights,
    scale_layers,
)
from fti4cir.tokens import tokenize_prompts
from fti4cir.training.m2c.losses import (
    hard_negative_info_nce,
    info_nce,
    soft_alignment_kl,
    stage2_loss,
)
from fti4cir.training.m2c.options import TrainOptions
from fti4cir.training.m2c.train import (
    stage1_data,
    train_stage1,
    train_stage2,
    triplet_recall,
)
from fti4cir.training.m2c.triplets import build_triplets, read_triplets, write_triplets


def make_model(backbone, seed=0, **overrides) -> M2CModel:
    torch.manual_seed(seed)
    return M2CModel(backbone, M2CNetwork(M2CConfig.for_backbone(backbone, **overrides)).eval())


def pil_images(n, seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def write_labelled_folder(root, classes, per_class, seed=0):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(pil_images(per_class, seed=seed + k)):
            image.save(root / name / f"{name}_{i}.png")
    return root


# ---- configuration and hook layers --------------------------------------------------------------------------------
def test_hook_layers_move_to_the_towers_depth(tiny_backbone):
    assert scale_layers(DEFAULT_VSI_LAYERS, 12) == (3, 7, 9, 11)
    assert scale_layers(DEFAULT_ADAPTER_LAYERS, 12) == (1, 3, 5, 7, 9, 11)
    assert scale_layers(DEFAULT_VSI_LAYERS, 24) == (7, 15, 19, 23)
    assert scale_layers(DEFAULT_VSI_LAYERS, 2) == scale_layers(DEFAULT_ADAPTER_LAYERS, 2) == (0, 1)
    config = M2CConfig.for_backbone(tiny_backbone)
    assert (config.text_layers, config.vsi_layers, config.adapter_layers) == (2, (0, 1), ())
    assert M2CConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match=r"VSI layers \[5\] do not exist"):
        M2CConfig.for_backbone(tiny_backbone, vsi_layers=(0, 5))
    net = M2CNetwork(config)
    net.add_adapters()
    assert net.config.adapter_layers == (0, 1) and len(net.adapters) == 2
    with pytest.raises(UserError, match="already have composing adapters"):
        net.add_adapters()


# ---- visual side and text encoder ---------------------------------------------------------------------------------
def test_patch_tokens_are_taken_after_ln_post_and_proj_from_one_pass(tiny_backbone, images):
    visual = tiny_backbone.encode_visual(images)
    tokens = projected_patch_tokens(tiny_backbone, visual.patch_tokens)
    assert tokens.shape == (4, 1 + 7 * 7, tiny_backbone.embed_dim)
    assert torch.allclose(tokens[:, 0], visual.global_features, atol=1e-6)  # CLS token = encode_image


def test_text_encoder_block_by_block_equals_clip_without_hooks(tiny_backbone):
    ids, mask = tokenize_prompts(
        PROMPTS["default"],
        [{"text": "is red"}, {"text": "has long sleeves and a hood"}],
        None,
        tiny_backbone.context_length,
    )
    torch.manual_seed(3)
    pseudo, patches = torch.randn(2, tiny_backbone.token_dim), torch.randn(2, 49, tiny_backbone.token_dim)
    clip_features = tiny_backbone.encode_tokens(ids, pseudo.unsqueeze(1), mask)
    plain = make_model(tiny_backbone, vsi_layers=())
    assert torch.equal(plain.encode_tokens(ids, mask, pseudo, None, use_adapters=False), clip_features)
    # A VSI hook after the last block only moves the '*' state: the EOS feature cannot see it.
    last_only = make_model(tiny_backbone, vsi_layers=(1,))
    assert torch.equal(last_only.encode_tokens(ids, mask, pseudo, patches, use_adapters=False), clip_features)
    first = make_model(tiny_backbone, vsi_layers=(0,))
    with torch.no_grad():
        injected = first.encode_tokens(ids, mask, pseudo, patches, use_adapters=False)
        other_patches = first.encode_tokens(ids, mask, pseudo, patches.flip(0), use_adapters=False)
    assert not torch.allclose(injected, clip_features, atol=1e-4)
    assert not torch.allclose(injected, other_patches, atol=1e-4)
    # two prompts stacked over the same references: the image side of VSI is computed once and tiled
    stacked_ids, stacked_mask = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)])
    with torch.no_grad():
        tiled = first.encode_tokens(stacked_ids, stacked_mask, pseudo.repeat(2, 1), patches, use_adapters=False)
        repeated = first.encode_tokens(
            stacked_ids, stacked_mask, pseudo.repeat(2, 1), patches.repeat(2, 1, 1), use_adapters=False
        )
    assert torch.equal(tiled, repeated) and torch.allclose(tiled[:2], injected, atol=1e-5)
    with pytest.raises(ValueError, match="patch tokens"):
        first.encode_tokens(ids, mask, pseudo, None, use_adapters=False)


def test_compose_takes_images_tensors_or_features(tiny_backbone):
    model = make_model(tiny_backbone)
    pil = pil_images(3)
    tensor = model.preprocess(pil)
    with torch.no_grad():
        from_pil = m2c_compose(model, pil, ["is red", "is blue", "is green"])
        from_tensor = m2c_compose(model, tensor, ["is red", "is blue", "is green"])
        from_features = m2c_compose(model, tiny_backbone.encode_visual(tensor), ["is red", "is blue", "is green"])
        variants = m2c_compose(model, tensor, [("is red", "is blue")] * 3)
        singles = [m2c_compose(model, tensor, [t] * 3) for t in ("is red", "is blue")]
    assert from_pil.shape == (3, tiny_backbone.embed_dim)
    assert torch.allclose(from_pil.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(from_pil, from_tensor)
    assert torch.allclose(from_tensor, from_features, atol=1e-6)
    assert torch.allclose(variants, F.normalize(singles[0] + singles[1], dim=-1), atol=1e-5)
    # the query depends on the reference and on the text
    assert not torch.allclose(from_tensor[0], from_tensor[1], atol=1e-3)
    assert not torch.allclose(from_tensor, singles[0], atol=1e-3)


def test_prompts_need_exactly_one_placeholder(tiny_backbone):
    model = make_model(tiny_backbone)
    for prompt in ("a photo of {text}", "a photo of * and * {text}"):
        with pytest.raises(UserError, match="exactly one"):
            m2c_compose(model, pil_images(1), ["x"], prompt=prompt)
    for prompt in PROMPTS.values():
        _, mask = tokenize_prompts(prompt, [{"text": "is red"}], None)
        assert int(mask.sum()) == 1
    assert fashioniq_text("is red", "has a collar") == "has a collar and is red"


def test_adapters_off_is_the_stage_one_query(tiny_backbone):
    model = make_model(tiny_backbone)
    references = pil_images(2)
    with torch.no_grad():
        before = m2c_compose(model, references, ["is red", "is blue"])
        with pytest.raises(UserError, match="no composing adapters"):
            m2c_compose(model, references, ["is red", "is blue"], use_adapters=True)
        model.net.add_adapters()
        for adapter in model.net.adapters:  # trained-looking adapters, far from their near-zero init
            adapter.down.normal_(std=0.3)
            adapter.up.normal_(std=0.3)
        off = m2c_compose(model, references, ["is red", "is blue"], use_adapters=False)
        on = m2c_compose(model, references, ["is red", "is blue"], use_adapters=True)
        default = m2c_compose(model, references, ["is red", "is blue"])
    assert torch.equal(off, before)
    assert torch.equal(default, on)
    assert not torch.allclose(on, before, atol=1e-3)


# ---- weights ------------------------------------------------------------------------------------------------------
def test_weights_round_trip(tmp_path, tiny_backbone):
    model = make_model(tiny_backbone, vsi_layers=(0,))
    model.net.add_adapters((1,), rank=8)
    model.net.vsi[0].conv[1].running_mean.normal_()  # buffers travel too
    path = save_m2c_weights(model.net, tmp_path / "m2c.safetensors")
    config = json.loads(path.with_suffix(".json").read_text())
    assert (config["method"], config["vsi_layers"], config["adapter_layers"], config["adapter_rank"]) == (
        "m2c",
        [0],
        [1],
        8,
    )
    assert is_m2c_weights(path)
    loaded = M2CModel(tiny_backbone, load_m2c_weights(path).eval())
    references = pil_images(2)
    with torch.no_grad():
        for use_adapters in (False, True):
            assert torch.equal(
                m2c_compose(model, references, ["a", "b"], use_adapters=use_adapters),
                m2c_compose(loaded, references, ["a", "b"], use_adapters=use_adapters),
            )
    path.with_suffix(".json").unlink()  # the config is also in the file's metadata
    assert load_m2c_weights(path).config == model.config
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_weights_are_refused(tmp_path, tiny_backbone):
    fti4cir_file = save_weights(
        InversionNetwork(InversionConfig(embed_dim=8, token_dim=8, patch_dim=8, num_k=4, topk=2)),
        tmp_path / "fti.safetensors",
    )
    assert not is_m2c_weights(fti4cir_file)
    with pytest.raises(UserError, match="M2C"):
        load_m2c_weights(fti4cir_file)
    path = save_m2c_weights(make_model(tiny_backbone).net, tmp_path / "m2c.safetensors")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupted or truncated"):
        load_m2c_weights(path)
    other = M2CNetwork(
        M2CConfig(embed_dim=32, token_dim=32, text_layers=4, grid=(7, 7), vsi_layers=(0,), backbone="other")
    )
    with pytest.raises(UserError, match="pass the matching --backbone"):
        M2CModel(tiny_backbone, other)


# ---- losses -------------------------------------------------------------------------------------------------------
def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_and_soft_alignment_match_their_definitions():
    a, b, c = _unit(6, 16, seed=1), _unit(6, 16, seed=2), _unit(6, 16, seed=3)
    logits = a @ b.t() / 0.07
    manual = -(logits.log_softmax(1).diag().mean() + logits.t().log_softmax(1).diag().mean()) / 2
    assert torch.allclose(info_nce(a, b, 0.07), manual, atol=1e-5)
    p, q = (c @ a.t() / 0.07).softmax(1), (c @ b.t() / 0.07).softmax(1)
    assert torch.allclose(soft_alignment_kl(c, a, b, 0.07), (q * (q.log() - p.log())).sum(1).mean(), atol=1e-5)
    assert float(soft_alignment_kl(c, b, b, 0.07)) == pytest.approx(0.0, abs=1e-6)


def _hard_negative_reference(queries, targets, temperature, topk, scale_mixed=True):
    """Row-by-row restatement of the stage-II composing loss."""
    b = len(queries)
    similarity = targets @ targets.t()
    to_text, to_image = [], []
    for i in range(b):
        logits = [float(queries[i] @ targets[j]) / temperature for j in range(b)]
        others = sorted((j for j in range(b) if j != i), key=lambda j: -logits[j])[: min(topk, b - 1)]
        low, high = float(similarity[i].min()), float(similarity[i].max())
        for j in others:
            w = (float(similarity[i, j]) - low) / (high - low + 1e-8)
            mixed = float(queries[i] @ (w * targets[i] + (1 - w) * targets[j]))
            logits.append(mixed / temperature if scale_mixed else mixed)
        to_image.append(-torch.tensor(logits).log_softmax(0)[i])
        column = torch.tensor([float(queries[j] @ targets[i]) / temperature for j in range(b)])
        to_text.append(-column.log_softmax(0)[i])
    return (torch.stack(to_text).mean() + torch.stack(to_image).mean()) / 2


@pytest.mark.parametrize("batch, topk", [(7, 3), (4, 10), (1, 10)])
def test_mixed_hard_negatives_are_scaled_by_the_temperature(batch, topk):
    queries, targets = _unit(batch, 12, seed=4), _unit(batch, 12, seed=5)
    loss = hard_negative_info_nce(queries, targets, 0.05, topk)
    assert torch.allclose(loss, _hard_negative_reference(queries, targets, 0.05, topk), atol=1e-4)
    if batch > 1:  # the released code's unscaled mixed logits give another loss
        assert not torch.allclose(
            loss, _hard_negative_reference(queries, targets, 0.05, topk, scale_mixed=False), atol=1e-2
        )


def test_stage2_loss_without_captions_has_no_kl():
    q, m, r, t = (_unit(5, 8, seed=s) for s in range(4))
    terms = stage2_loss(q, m, r, t, None, temperature=0.01)
    assert float(terms.kl) == 0.0
    assert torch.allclose(terms.total, terms.contrastive + terms.anchor)
    with_kl = stage2_loss(q, m, r, t, _unit(5, 8, seed=9), temperature=0.01, kl_weight=0.2)
    assert torch.allclose(with_kl.total, with_kl.contrastive + with_kl.anchor + 0.2 * with_kl.kl)


# ---- triplets -----------------------------------------------------------------------------------------------------
def test_synthetic_triplets_from_a_labelled_folder(tmp_path):
    root = write_labelled_folder(tmp_path / "photos", ["shirt", "long_dress", "hat"], 4)
    records = build_triplets(root, tmp_path, seed=3, with_ground_truths=True)
    assert len(records) == 12
    for r in records:
        ref_class, target_class = r["reference"].split("/")[-2], r["target"].split("/")[-2]
        assert ref_class != target_class
        assert r["text"] == f"as a {target_class.replace('_', ' ')}"
        assert r["reference_caption"] == f"a photo of a {ref_class.replace('_', ' ')}"
        assert sorted(r["ground_truths"]) == sorted(f"photos/{target_class}/{target_class}_{i}.png" for i in range(4))
    assert build_triplets(root, tmp_path, seed=3, with_ground_truths=True) == records
    assert build_triplets(root, tmp_path, seed=4) != [
        {k: v for k, v in r.items() if k != "ground_truths"} for r in records
    ]
    assert len(build_triplets(root, tmp_path, per_reference=2)) == 24
    small = build_triplets(root, tmp_path, max_per_class=2, template="in {label}")
    assert len(small) == 6 and len({r["reference"] for r in small} | {r["target"] for r in small}) <= 6
    assert all(r["text"].startswith("in ") for r in small)
    with pytest.raises(UserError, match="label"):
        build_triplets(root, tmp_path, template="as something else")
    with pytest.raises(UserError, match="at least two class"):
        build_triplets(write_labelled_folder(tmp_path / "one", ["only"], 2), tmp_path)


def test_triplets_jsonl_reader(tmp_path):
    (tmp_path / "sub").mkdir()
    file = tmp_path / "sub" / "t.jsonl"
    lines = [
        {"reference": "a.jpg", "text": "is red", "target": "/abs/b.jpg", "reference_caption": "a shirt"},
        {
            "reference": "../c.jpg",
            "target_caption": "a blue shirt",
            "target": "d.jpg",
            "ground_truths": ["d.jpg", "e.jpg"],
        },
    ]
    file.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    first, second = read_triplets(file)
    assert (first.reference, first.target, first.text, first.reference_caption) == (
        tmp_path / "sub" / "a.jpg",
        Path("/abs/b.jpg"),
        "is red",
        "a shirt",
    )
    assert second.reference == tmp_path / "c.jpg" and second.text == "a blue shirt"
    assert second.answers == (tmp_path / "sub" / "d.jpg", tmp_path / "sub" / "e.jpg")
    assert first.answers == (first.target,)
    for bad, message in [
        ("{not json", "not valid JSON"),
        ('{"reference": "a", "text": "t"}', "'target'"),
        ('{"reference": "a", "target": "b"}', "needs a 'text'"),
        ("[1]", "JSON object"),
        ('{"reference": "a", "target": "b", "text": "t", "ground_truths": "x"}', "ground_truths"),
    ]:
        file.write_text(json.dumps(lines[0]) + "\n" + bad + "\n")
        with pytest.raises(UserError, match=f"t.jsonl line 2: .*{message}"):
            read_triplets(file)
    file.write_text("\n")
    with pytest.raises(UserError, match="no triplets"):
        read_triplets(file)


def test_stage1_captions_from_labels_or_a_captions_file(tmp_path):
    root = write_labelled_folder(tmp_path / "photos", ["shirt", "t-shirt"], 2)
    paths, captions = stage1_data(root)
    assert [c for _, c in sorted(zip(paths, captions))] == ["a photo of a shirt"] * 2 + ["a photo of a t-shirt"] * 2
    captions_file = tmp_path / "captions.jsonl"
    captions_file.write_text(
        json.dumps({"image": "shirt/shirt_1.png", "sha1": "0" * 40, "caption": "a blue shirt"}) + "\n"
    )
    assert stage1_data(root, captions_file) == ([root / "shirt" / "shirt_1.png"], ["a blue shirt"])
    pil_images(1)[0].save(root / "loose.png")
    with pytest.raises(UserError, match="--captions"):
        stage1_data(root)


def test_command_line_runs_both_stages(tmp_path, capsys):
    photos = write_labelled_folder(tmp_path / "photos", ["red", "blue", "green"], 4)
    common = [
        "--backbone",
        "fti4cir-tiny",
        "--pretrained",
        "none",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--num-workers",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert (
        run_subcommand(
            m2c_train_command,
            ["m2c-train", "--stage", "1", "--images", str(photos), "--out", str(tmp_path / "s1.safetensors"), *common],
        )
        == 0
    )
    assert (
        run_subcommand(
            triplets_command, ["triplets", str(photos), "--out", str(tmp_path / "t.jsonl"), "--ground-truths"]
        )
        == 0
    )
    assert len(read_triplets(tmp_path / "t.jsonl")) == 12
    assert (
        run_subcommand(
            m2c_train_command,
            [
                "m2c-train",
                "--stage",
                "2",
                "--init",
                str(tmp_path / "s1.safetensors"),
                "--triplets",
                str(tmp_path / "t.jsonl"),
                "--out",
                str(tmp_path / "s2.safetensors"),
                "--adapter-rank",
                "16",
                "--val-triplets",
                str(tmp_path / "t.jsonl"),
                "--gallery",
                str(photos),
                *common,
            ],
        )
        == 0
    )
    stage2 = load_m2c_weights(tmp_path / "s2.safetensors")
    assert (stage2.config.adapter_layers, stage2.config.adapter_rank) == ((0, 1), 16)
    out = capsys.readouterr().out
    assert "held-out m2c: R@1" in out and "held-out m2c+compose: R@1" in out
    with pytest.raises(UserError, match="--init"):
        run_subcommand(
            m2c_train_command,
            [
                "m2c-train",
                "--stage",
                "2",
                "--triplets",
                str(tmp_path / "t.jsonl"),
                "--out",
                str(tmp_path / "x.safetensors"),
                *common,
            ],
        )


# ---- both stages on real photos -----------------------------------------------------------------------------------
# With the random-weight tiny backbone the clothing categories are not visible in the image features (free per-class
# query vectors retrieve them at chance), so "as a {category}" cannot be learned. The training tests therefore use
# classes the random features do see: colour treatments of the clothing photos, disjoint photos per class; the
# builder, both stages and the held-out evaluation are the ones of the real recipe.
TREATMENTS = {"red": (1.0, 0.3, 0.3), "green": (0.3, 1.0, 0.3), "blue": (0.3, 0.3, 1.0), "gray": None}


def _treated_folder(source_dir, target_dir, per_class, seed):
    sources = list_images(source_dir)
    random.Random(seed).shuffle(sources)
    for k, (name, gains) in enumerate(TREATMENTS.items()):
        (target_dir / name).mkdir(parents=True)
        for source in sources[k * per_class : (k + 1) * per_class]:
            with PIL.Image.open(source) as image:
                image = image.convert("RGB").resize((224, 224), PIL.Image.BILINEAR)
            if gains is None:
                image = image.convert("L").convert("RGB")
            else:
                image = PIL.Image.merge(
                    "RGB", [band.point(lambda v, g=g: int(v * g)) for band, g in zip(image.split(), gains)]
                )
            image.save(target_dir / name / f"{source.parent.name}_{source.stem}.jpg", quality=90)
    return target_dir


@pytest.fixture(scope="module")
def two_stages(tiny_backbone, tmp_path_factory):
    clothing = shared_data("photos", "clothing")
    work = tmp_path_factory.mktemp("m2c")
    train_dir = _treated_folder(clothing / "train", work / "train", 20, seed=0)
    test_dir = _treated_folder(clothing / "test", work / "test", 15, seed=1)
    write_triplets(build_triplets(train_dir, work, seed=1, template="in {label}"), work / "train.jsonl")
    write_triplets(
        build_triplets(test_dir, work, seed=2, template="in {label}", with_ground_truths=True), work / "held_out.jsonl"
    )
    held_out, gallery = read_triplets(work / "held_out.jsonl"), list_images(test_dir)

    model = make_model(tiny_backbone)
    paths, captions = stage1_data(train_dir)
    stage1_paths = [p for i, p in enumerate(paths) if i % 2 == 0]  # 10 photos per class
    stage1_captions = [c for i, c in enumerate(captions) if i % 2 == 0]
    history1 = train_stage1(
        model,
        stage1_paths,
        stage1_captions,
        TrainOptions(epochs=5, batch_size=20, lr=1e-3, warmup=0, num_workers=0),
        progress=False,
    )
    store = FeatureStore.for_model(work / "cache", model, with_patches=True)
    stage1_state = {k: v.clone() for k, v in model.net.state_dict().items()}
    recall1 = triplet_recall(model, held_out, gallery, store, use_adapters=False, num_workers=0)

    model.net.add_adapters()
    history2 = train_stage2(
        model,
        read_triplets(work / "train.jsonl"),
        TrainOptions(epochs=10, batch_size=40, lr=5e-3, warmup=2, num_workers=0, augment="views", views=2),
        cache_dir=work / "cache",
        progress=False,
    )
    recall2 = triplet_recall(model, held_out, gallery, store, use_adapters=True, num_workers=0)
    print(f"\nM2C held-out Recall: stage I {recall1}, stage II {recall2}")
    return {
        "history1": history1,
        "history2": history2,
        "recall1": recall1,
        "recall2": recall2,
        "model": model,
        "stage1_state": stage1_state,
    }


def test_stage1_loss_falls(two_stages):
    losses = [h["total"] for h in two_stages["history1"]]
    assert losses[-1] < losses[0] - 0.2, losses


def test_stage2_loss_falls(two_stages):
    losses = [h["total"] for h in two_stages["history2"]]
    assert losses[-1] < losses[0] - 1.0, losses


def test_stage2_trains_only_the_adapters_in_the_official_train_mode(two_stages):
    """Stage-I parameters stay; as in the official stage II, Phi and VSI run in train mode, so the VSI BatchNorm
    running statistics follow the stage-II batches (and are saved with the stage-II weights)."""
    state = two_stages["model"].net.state_dict()
    statistics = [
        k
        for k in two_stages["stage1_state"]
        if k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")
    ]
    for key, value in two_stages["stage1_state"].items():
        if key not in statistics:
            assert torch.equal(state[key], value), key
    assert statistics and all(not torch.equal(state[k], two_stages["stage1_state"][k]) for k in statistics)


def test_stage2_beats_stage1_on_held_out_triplets(two_stages):
    recall1, recall2 = two_stages["recall1"], two_stages["recall2"]
    assert recall2["R@10"] >= recall1["R@10"] + 0.2, (recall1, recall2)
    assert recall2["R@1"] > recall1["R@1"], (recall1, recall2)
