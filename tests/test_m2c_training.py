"""M2C training against the official code: loss parity (intended and as released), optimizer and schedule, seeded
views, the official-checkpoint converter, kill -9 resume of both stages, and the gathered negatives of two
processes."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import signal
import socket
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torchvision.transforms import RandomResizedCrop

from conftest import random_m2c, run_subcommand
from fti4cir.commands import convert as convert_command
from fti4cir.commands import m2c_train as m2c_train_command
from fti4cir.errors import UserError
from fti4cir.features import hash_files
from fti4cir.m2c import M2CConfig, M2CModel, M2CNetwork, load_m2c_weights, m2c_compose
from fti4cir.m2c import convert as m2c_convert
from fti4cir.m2c.convert import official_name
from fti4cir.training import loop
from fti4cir.training.m2c import train as m2c_train
from fti4cir.training.m2c.distributed import World, gather_rows, sum_gradients
from fti4cir.training.m2c.losses import stage1_loss, stage2_loss
from fti4cir.training.m2c.official import official_stage1_loss, official_stage2_loss
from fti4cir.training.m2c.options import TrainOptions, official_adam
from fti4cir.training.m2c.train import make_optimizer, official_lr
from fti4cir.training.m2c.triplets import read_triplets
from fti4cir.training.m2c.views import VIEW_A, VIEW_B, augment, cached_views, crop_box, derived_seed


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def features(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- losses against the official re-statement ---------------------------------------------------------------------
def test_stage1_loss_equals_the_official():
    query, view_a, view_b, captions = (features(8, 16, seed=s) for s in range(4))
    ours = stage1_loss(*(F.normalize(x, dim=-1) for x in (query, view_a, view_b, captions)), temperature=0.07)
    official = official_stage1_loss(view_b, view_a, query, captions, temperature=0.07)
    assert torch.allclose(ours.total, official, rtol=1e-12, atol=0)


@pytest.mark.parametrize("batch, topk", [(8, 3), (6, 5)])
@pytest.mark.parametrize("as_released", [False, True])
def test_stage2_loss_equals_the_official(batch, topk, as_released):
    """Default: the official loss with the gather and 1/t fixed; as_released: the released one."""
    query, mapping, reference, target, captions = (features(batch, 16, seed=10 + s) for s in range(5))
    ours = stage2_loss(
        *(F.normalize(x, dim=-1) for x in (query, mapping, reference, target, captions)),
        temperature=0.01,
        topk=topk,
        as_released=as_released,
    )
    official = official_stage2_loss(
        target, reference, query, mapping, captions, temperature=0.01, topk=topk, fixed=not as_released
    )
    other = official_stage2_loss(
        target, reference, query, mapping, captions, temperature=0.01, topk=topk, fixed=as_released
    )
    assert torch.allclose(ours.total, official, rtol=1e-12, atol=0)
    assert abs(float(ours.total - other)) > 1e-3  # the two variants differ on these batches


def _fixed_views(model, paths, spec, role, rows):
    """The crops step 0 of epoch 0 (seed 0) trains on, and their visual features."""
    views = torch.stack(
        [
            augment(PIL.Image.open(paths[r]), spec, model.backbone.image_size, derived_seed(0, 0, role, int(r)))
            for r in rows
        ]
    )
    with torch.no_grad():
        return model.backbone.encode_visual(views)


def test_stage1_training_step_equals_the_official_loss_on_its_views(tiny_backbone, data):
    """The first step's loss (before any update) equals the official loss on the features of the same views: view
    A to Phi / VSI and the view-A term, view B to the contrastive target and the KL. Dropout 0 (BatchNorm still on
    batch statistics) so that both sides compute the same features."""
    paths = sorted((data / "photos").rglob("*.png"))[:6]
    captions = [f"a photo of thing {i}" for i in range(6)]
    torch.manual_seed(0)
    model = M2CModel(tiny_backbone, M2CNetwork(M2CConfig.for_backbone(tiny_backbone, dropout=0.0)))
    start = {k: v.clone() for k, v in model.net.state_dict().items()}
    history = m2c_train.train_stage1(
        model, paths, captions, TrainOptions(epochs=1, batch_size=6, num_workers=0), progress=False
    )
    model.net.load_state_dict(start)
    model.net.train()
    rows = np.arange(6)
    visual_a, view_b = (_fixed_views(model, paths, spec, role, rows) for spec, role in ((VIEW_A, "A"), (VIEW_B, "B")))
    with torch.no_grad():
        image_a, patches = model.visual_inputs(visual_a)
        query = model.encode("a photo of *", None, image_a, patches, use_adapters=False)
        official = official_stage1_loss(view_b.global_features, image_a, query, tiny_backbone.encode_text(captions))
    assert history[0]["total"] == pytest.approx(float(official), rel=1e-5)


@pytest.mark.parametrize("as_released", [False, True])
def test_stage2_training_step_equals_the_official_loss_on_its_views(tiny_backbone, data, as_released):
    """Stage II likewise: reference and target crops of the first step, the composed and the mapping sentence (each
    encoded on its own here: the training's joint pass of both over duplicated images gives the same BatchNorm
    statistics), the target images in the KL; intended and as-released hard negatives."""
    triplets = read_triplets(data / "triplets.jsonl")[:6]
    torch.manual_seed(0)
    model = M2CModel(tiny_backbone, M2CNetwork(M2CConfig.for_backbone(tiny_backbone, dropout=0.0)))
    model.net.add_adapters(rank=8)
    start = {k: v.clone() for k, v in model.net.state_dict().items()}
    options = TrainOptions(epochs=1, batch_size=6, num_workers=0, topk=3, as_released=as_released)
    history = m2c_train.train_stage2(model, triplets, options, cache_dir=data / "cache", progress=False)
    model.net.load_state_dict(start)
    model.net.train()
    images = sorted({p for t in triplets for p in (t.reference, t.target)})
    position = {p: i for i, p in enumerate(images)}
    rows = np.arange(6)
    reference = torch.stack(
        [
            augment(PIL.Image.open(t.reference), VIEW_B, tiny_backbone.image_size, derived_seed(0, 0, "ref", int(r)))
            for r, t in zip(rows, triplets)
        ]
    )
    target = torch.stack(
        [
            augment(PIL.Image.open(t.target), VIEW_B, tiny_backbone.image_size, derived_seed(0, 0, "tgt", int(r)))
            for r, t in zip(rows, triplets)
        ]
    )
    assert len(position) > 6  # references and targets are different images
    with torch.no_grad():
        image, patches = model.visual_inputs(tiny_backbone.encode_visual(reference))
        query = model.encode(m2c_train.TRAIN_PROMPT, [t.text for t in triplets], image, patches, use_adapters=True)
        mapping = model.encode("a photo of *", None, image, patches, use_adapters=True)
        official = official_stage2_loss(
            tiny_backbone.encode_image(target),
            image,
            query,
            mapping,
            tiny_backbone.encode_text([t.reference_caption for t in triplets]),
            topk=3,
            fixed=not as_released,
        )
    assert history[0]["total"] == pytest.approx(float(official), rel=1e-5)


# ---- optimizer, schedule ------------------------------------------------------------------------------------------
def test_official_optimizer_settings(tiny_backbone):
    assert official_adam("ViT-L-14") == official_adam("ViT-B-32") == (0.9, 0.98, 1e-6)
    assert official_adam("RN50") == official_adam("fti4cir-tiny") == (0.9, 0.999, 1e-8)
    net = random_m2c(tiny_backbone, 2)
    optimizer = make_optimizer(net, "", TrainOptions(), (0.9, 0.98), 1e-6)
    no_decay, decay = ({id(p) for p in g["params"]} for g in optimizer.param_groups)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[i] for i in no_decay} == {n for n in names.values() if n.endswith("bias")}
    assert any(n.endswith("conv.1.weight") for n in (names[i] for i in decay))  # BatchNorm gains are decayed
    assert any(n.endswith("norm.weight") for n in (names[i] for i in decay))  # LayerNorm gains too
    assert optimizer.param_groups[1]["betas"] == (0.9, 0.98) and optimizer.param_groups[1]["eps"] == 1e-6


def test_official_schedule_is_not_capped():
    assert official_lr(0, 1e-4, 100, 50) == pytest.approx(1e-6)
    assert official_lr(49, 1e-4, 100, 50) == pytest.approx(5e-5)  # a short run never leaves the warm-up
    assert official_lr(100, 1e-4, 100, 300) == pytest.approx(1e-4)
    assert official_lr(200, 1e-4, 100, 300) == pytest.approx(5e-5)
    assert official_lr(5, 1e-4, 0, 10) == pytest.approx(5e-5)


def test_command_line_options_reach_training():
    parser = argparse.ArgumentParser()
    m2c_train_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "m2c-train",
            "--stage",
            "2",
            "--out",
            "x.safetensors",
            "--as-released",
            "--augment",
            "views",
            "--views",
            "3",
            "--beta2",
            "0.95",
        ]
    )
    options = m2c_train_command.options_from_args(args)
    assert (options.as_released, options.augment, options.views, options.warmup) == (True, "views", 3, None)
    assert options.resolved(2, "ViT-L-14") == (100, 0.01, (0.9, 0.95), 1e-6)
    defaults = m2c_train_command.options_from_args(
        parser.parse_args(["m2c-train", "--stage", "1", "--out", "x.safetensors"])
    )
    assert (defaults.as_released, defaults.augment) == (False, "online")
    assert defaults.resolved(1, "ViT-B-32") == (10000, 0.07, (0.9, 0.98), 1e-6)


def test_official_names_cover_the_188_tensors_one_to_one():
    config = M2CConfig(embed_dim=768, token_dim=768, text_layers=12, grid=(16, 16), adapter_layers=(1, 3, 5, 7, 9, 11))
    keys = list(M2CNetwork(config).state_dict())
    names = {official_name(k) for k in keys}
    assert len(keys) == len(names) == 188
    assert {
        "fc_out.weight",
        "fc_out_hidden.bias",
        "layers.layers.1.0.weight",
        "adapters.3.conv.1.running_var",
        "adapters.0.ca.layers.1.multihead_attn.in_proj_weight",
        "adapters.2.rehid.layers.1.0.bias",
        "adapters.1.hid_3.layers.0.0.weight",
        "adapters.0.ca.layers.0.norm2.weight",
        "lora_layers.5.B",
    } <= names


# ---- views --------------------------------------------------------------------------------------------------------
def photo(seed, size=(50, 38)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_crops_are_torchvisions_drawn_from_a_seeded_generator():
    image = photo(0, (224, 180))
    for seed in range(5):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, [0.8, 1.0], [3 / 4, 4 / 3])
        assert crop_box(224, 180, VIEW_A, torch.Generator().manual_seed(seed)) == expected
    assert torch.equal(augment(image, VIEW_A, 32, 7), augment(image, VIEW_A, 32, 7))
    assert not torch.equal(augment(image, VIEW_A, 32, 7), augment(image, VIEW_A, 32, 8))


def test_cached_views_are_exactly_the_visual_towers_features(tiny_backbone, tmp_path):
    model = M2CModel(tiny_backbone, random_m2c(tiny_backbone, 1))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"p{i}.png")
        photo(i).save(paths[-1])
    cache = cached_views(
        model, paths, tmp_path / "cache", VIEW_B, 2, 5, with_patches=True, num_workers=0, progress=False
    )
    assert cache.views == 2 and cache.readable().all()
    hashes = hash_files(paths)
    images, views = np.array([2, 0, 1, 2]), np.array([1, 0, 1, 0])
    got = cache.get(images, views)
    with torch.no_grad():
        expected = tiny_backbone.encode_visual(
            torch.stack(
                [
                    augment(
                        PIL.Image.open(paths[i]), VIEW_B, tiny_backbone.image_size, derived_seed(5, hashes[i], int(v))
                    )
                    for i, v in zip(images, views)
                ]
            )
        )
    assert torch.allclose(got.global_features.float(), expected.global_features, atol=2e-3)  # fp16 cache
    assert torch.allclose(got.patch_tokens.float(), expected.patch_tokens, atol=2e-3)
    again = cached_views(
        model, paths, tmp_path / "cache", VIEW_B, 2, 5, with_patches=True, num_workers=0, progress=False
    )
    assert np.array_equal(again.rows, cache.rows)  # found in the cache, not recomputed


@pytest.mark.parametrize("augment", ["views", "none"])
def test_stage1_trains_from_cached_views_or_centre_crops(tiny_backbone, data, augment):
    """Cached modes: the visual tower runs only to fill the cache, an unreadable image is left out before
    training."""
    paths = sorted((data / "photos").rglob("*.png"))
    broken = data / f"broken-{augment}.png"
    broken.write_bytes(b"not an image")
    model = M2CModel(tiny_backbone, random_m2c(tiny_backbone, 1))
    calls = []
    encode = tiny_backbone.encode_visual
    tiny_backbone.encode_visual = lambda images: calls.append(len(images)) or encode(images)
    try:
        options = TrainOptions(epochs=2, batch_size=4, lr=1e-3, warmup=0, num_workers=0, augment=augment, views=2)
        history = m2c_train.train_stage1(
            model,
            paths + [broken],
            ["a photo"] * (len(paths) + 1),
            options,
            cache_dir=data / f"cache-{augment}",
            progress=False,
        )
    finally:
        del tiny_backbone.encode_visual
    assert [h["steps"] for h in history] == [3, 3] and all(np.isfinite(h["total"]) for h in history)
    # the cache fill only: 2 crops x views A and B, or one centre crop for both
    assert sum(calls) == len(paths) * (4 if augment == "views" else 1)


# ---- converter ----------------------------------------------------------------------------------------------------
def official_checkpoint(net: M2CNetwork, path: Path, epoch=3) -> Path:
    """A file of the official structure (src/main.py's torch.save) holding `net`'s tensors under official names."""
    c = net.config
    state = net.state_dict()
    img2text = {"module." + official_name(k): v for k, v in state.items() if not k.startswith("adapters.")}
    record = {
        "epoch": epoch,
        "name": "run",
        "state_dict": {"module.logit_scale": torch.tensor(4.6)},
        "args": argparse.Namespace(
            va_layers=list(c.vsi_layers),
            ca_layers=list(c.adapter_layers),
            adapter_dim=c.vsi_dim,
            lora_rank=c.adapter_rank,
            stage=2,
            lr=1e-4,
            model="ViT-L-14.pt",
            multigpu=None,
        ),
        "state_dict_img2text": img2text,
        "optimizer": {
            "state": {0: {"step": torch.tensor(9.0), "exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "params": [0]}],
        },
    }
    if net.has_adapters:
        record["state_dict_lora"] = {
            "module." + official_name(k): v for k, v in state.items() if k.startswith("adapters.")
        }
    torch.save(record, path)
    return path


@pytest.mark.parametrize("stage", [1, 2])
def test_converted_checkpoint_gives_the_same_queries(tiny_backbone, tmp_path, stage):
    net = random_m2c(tiny_backbone, stage)
    src = official_checkpoint(net, tmp_path / "epoch_3.pt")
    out = tmp_path / "m2c.safetensors"
    assert (
        run_subcommand(
            convert_command, ["convert-m2c", str(src), str(out), "--backbone", "fti4cir-tiny", "--pretrained", "none"]
        )
        == 0
    )
    converted = load_m2c_weights(out)
    assert converted.config.adapter_layers == net.config.adapter_layers
    assert converted.config.extra["epoch"] == 3
    references = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    texts = ["is red", "has long sleeves", "as a shoe"]
    with torch.no_grad():
        for use_adapters in [False, True][:stage]:
            direct = m2c_compose(M2CModel(tiny_backbone, net), references, texts, use_adapters=use_adapters)
            ours = m2c_compose(M2CModel(tiny_backbone, converted.eval()), references, texts, use_adapters=use_adapters)
            assert torch.equal(ours, direct)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_converter_refuses_code_and_wrong_structures(tiny_backbone, tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict_img2text": {}, "args": _RunsCode(marker)}, bad)
    with pytest.raises(UserError, match="not allowed"):
        m2c_convert.convert_official_m2c(bad, tmp_path / "x.safetensors", "fti4cir-tiny")
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    with open(plain, "wb") as f:
        pickle.dump({"state_dict_img2text": {}}, f)
    with pytest.raises(UserError, match="not a torch zip"):
        m2c_convert.convert_official_m2c(plain, tmp_path / "x.safetensors", "fti4cir-tiny")
    src = official_checkpoint(random_m2c(tiny_backbone, 1), tmp_path / "ok.pt")
    with pytest.raises(UserError, match="pass the matching --backbone"):
        m2c_convert.convert_official_m2c(src, tmp_path / "x.safetensors", "ViT-B-32")
    record = torch.load(src, weights_only=False)
    del record["state_dict_img2text"]["module.fc_out_hidden.bias"]
    torch.save(record, tmp_path / "missing.pt")
    with pytest.raises(UserError, match="fc_out_hidden.bias"):
        m2c_convert.convert_official_m2c(tmp_path / "missing.pt", tmp_path / "x.safetensors", "fti4cir-tiny")


# ---- kill -9 resume -----------------------------------------------------------------------------------------------
CLASSES = ("red", "green", "blue")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 photos in 3 class folders (stage I: 3 steps of 4 per epoch) and 12 triplets over them (stage II)."""
    root = tmp_path_factory.mktemp("m2c-resume")
    paths = []
    for i in range(12):
        (root / "photos" / CLASSES[i % 3]).mkdir(parents=True, exist_ok=True)
        paths.append(root / "photos" / CLASSES[i % 3] / f"p{i}.png")
        photo(i).save(paths[-1])
    records = [
        {
            "reference": str(paths[i]),
            "target": str(paths[(i + 4) % 12]),
            "text": f"as a {CLASSES[(i + 1) % 3]}",
            "reference_caption": f"a photo of a {CLASSES[i % 3]}",
        }
        for i in range(12)
    ]
    (root / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def argv(data: Path, stage: int, out: Path, *extra: str) -> list[str]:
    common = [
        "m2c-train",
        "--stage",
        str(stage),
        "--out",
        str(out),
        "--backbone",
        "fti4cir-tiny",
        "--pretrained",
        "none",
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--adapter-rank",
        "8",
        "--cache-dir",
        str(data / "cache"),
        "--checkpoint-steps",
        "2",
    ]
    inputs = (
        ["--images", str(data / "photos")]
        if stage == 1
        else [
            "--init",
            str(data / "straight1.safetensors"),
            "--triplets",
            str(data / "triplets.jsonl"),
            "--augment",
            "views",
            "--views",
            "2",
        ]
    )
    return common + inputs + list(extra)


@pytest.fixture(scope="module")
def straight(data):
    """Both stages uninterrupted (stage II starts from this stage I)."""
    for stage in (1, 2):
        assert run_subcommand(m2c_train_command, argv(data, stage, data / f"straight{stage}.safetensors")) == 0
    return data


def history(out: Path) -> list[dict]:
    record = json.loads((out.with_suffix(".run") / "checkpoint.json").read_text())
    return [{k: v for k, v in h.items() if k != "seconds"} for h in record["history"]]


def train_then_die(where: str, at: int, args: list[str]) -> None:
    """In a forked child: run `m2c-train`, SIGKILL itself while computing the loss of step `at` or right before
    committing the checkpoint of step `at`."""
    losses = {1: m2c_train.stage1_loss, 2: m2c_train.stage2_loss}
    commit, calls = loop.write_json_atomic, [0]

    def dying(loss):
        def wrapped(*a, **k):
            calls[0] += 1
            if where == "step" and calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return loss(*a, **k)

        return wrapped

    def dying_commit(path, record, **kwargs):
        if where == "commit" and record["global_step"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(path, record, **kwargs)

    m2c_train.stage1_loss, m2c_train.stage2_loss = dying(losses[1]), dying(losses[2])
    loop.write_json_atomic = dying_commit
    run_subcommand(m2c_train_command, args)


@pytest.mark.parametrize("stage, where, at, committed", [(1, "step", 5, 4), (1, "commit", 4, 3), (2, "step", 5, 4)])
def test_sigkill_then_resume_equals_the_uninterrupted_run(straight, tmp_path, stage, where, at, committed):
    out = tmp_path / f"m2c{stage}.safetensors"
    child = multiprocessing.get_context("fork").Process(
        target=train_then_die, args=(where, at, argv(straight, stage, out))
    )
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    record = json.loads((out.with_suffix(".run") / "checkpoint.json").read_text())
    assert record["global_step"] == committed
    with pytest.raises(UserError, match="--resume"):
        run_subcommand(m2c_train_command, argv(straight, stage, out))
    with pytest.raises(UserError, match="lr: checkpoint 0.001, now 0.5"):
        run_subcommand(m2c_train_command, argv(straight, stage, out, "--resume", "--lr", "0.5"))
    assert run_subcommand(m2c_train_command, argv(straight, stage, out, "--resume")) == 0
    expected, got = load_file(straight / f"straight{stage}.safetensors"), load_file(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert history(out) == history(straight / f"straight{stage}.safetensors")


# ---- two processes: one pool of negatives -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(inputs: dict, projection: torch.nn.Linear, world: World, rows: slice):
    """Stage-I and stage-II totals of the features of `rows` (through one shared Linear), gathered over the world."""
    f = {k: F.normalize(projection(v[rows]), dim=-1) for k, v in inputs.items()}
    g = {k: gather_rows(v, world) for k, v in f.items()}
    one = stage1_loss(g["query"], g["view_a"], g["view_b"], g["captions"], temperature=0.07).total
    two = stage2_loss(
        g["query"], g["view_a"], g["view_b"], g["captions"], g["captions"], temperature=0.01, topk=3
    ).total
    return one, two


def _inputs():
    return {k: features(8, 6, seed=30 + i) for i, k in enumerate(("query", "view_a", "view_b", "captions"))}


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = World(rank, 2)
    torch.manual_seed(0)
    projection = torch.nn.Linear(6, 5).double()
    one, two = _losses(_inputs(), projection, world, slice(4 * rank, 4 * rank + 4))
    (one + two).backward()
    local = projection.weight.grad.clone()
    sum_gradients(projection.parameters(), world)
    summed = projection.weight.grad.clone()
    projection.weight.grad.copy_(local)
    sum_gradients(projection.parameters(), world, average=True)  # --as-released: DDP's average
    torch.save(
        {"one": one.detach(), "two": two.detach(), "grad": summed, "averaged": projection.weight.grad},
        f"{out}/{rank}.pt",
    )
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    port = _free_port()
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    assert [p.exitcode for p in ranks] == [0, 0]
    torch.manual_seed(0)
    projection = torch.nn.Linear(6, 5).double()
    one, two = _losses(_inputs(), projection, World(), slice(0, 8))
    (one + two).backward()
    for r in range(2):
        got = torch.load(tmp_path / f"{r}.pt")
        assert torch.equal(got["one"], one.detach()) and torch.equal(got["two"], two.detach())
        assert torch.allclose(got["grad"], projection.weight.grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(got["averaged"], projection.weight.grad / 2, rtol=1e-10, atol=1e-12)
