"""Training data, the trainer's resume guarantees (bit-for-bit, SIGKILL-safe) and a learning check on real photos."""

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run_subcommand, shared_data
from fti4cir import create_model
from fti4cir.backbone import Backbone
from fti4cir.commands import train as train_command
from fti4cir.errors import UserError
from fti4cir.features import FeatureStore, extract_features
from fti4cir.imagefiles import list_images
from fti4cir.inputs import load_image
from fti4cir.training import loop, trainer
from fti4cir.training.data import epoch_batches, prepare_training_data, read_pairs
from fti4cir.training.losses import pseudo_sentence_features
from fti4cir.weights import load_weights

NUM_PAIRS = 24  # 3 steps of 8 per epoch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model steps are all per-op overhead: a second intra-op thread only adds waiting (10x slower on a busy
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def write_pairs(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 random images in nested class folders (two formats) and their pairs (one without a sha1)."""
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    records = []
    for i in range(NUM_PAIRS):
        rel = Path(f"class{i % 3}") / ("deep" if i % 2 else "") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(30, 90)), int(rng.integers(30, 90)), 3)
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(path)
        record = {"image": rel.as_posix(), "subject": f"a thing {i % 5}", "attribute": f"with {i} red spots"}
        if i != 5:
            record["sha1"] = sha1(path)
        records.append(record)
    return {
        "root": root,
        "images": root / "images",
        "pairs": write_pairs(root / "pairs.jsonl", records),
        "cache": root / "cache",
    }


@pytest.fixture(scope="module")
def cached(dataset):
    """The features of every training image, extracted once for the module (the visual tower's only runs)."""
    config = trainer.TrainConfig(
        images=str(dataset["images"]),
        pairs=str(dataset["pairs"]),
        out="unused",
        backbone="fti4cir-tiny",
        pretrained=None,
    )
    model = create_model(config.model_spec("cpu"))
    store = FeatureStore.for_model(dataset["cache"], model, with_patches=True)
    data = prepare_training_data(model, dataset["images"], dataset["pairs"], store, progress=False)
    assert len(data) == NUM_PAIRS and not data.dropped
    return dataset


@contextlib.contextmanager
def visual_tower_disabled():
    """Every entry point to the visual tower raises: training must read cached features only."""

    def refuse(*args, **kwargs):
        raise AssertionError("the visual tower ran during training")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Backbone, "encode_visual", refuse)
        patch.setattr(Backbone, "encode_image", refuse)
        patch.setattr(open_clip.transformer.VisionTransformer, "forward", refuse)
        yield


@pytest.fixture
def no_visual_tower(cached):
    with visual_tower_disabled():
        yield cached


def run_args(dataset) -> list[str]:
    """The settings of every run in this module (lr decays from the second epoch on)."""
    return [
        "--images",
        str(dataset["images"]),
        "--pairs",
        str(dataset["pairs"]),
        "--cache-dir",
        str(dataset["cache"]),
        "--backbone",
        "fti4cir-tiny",
        "--pretrained",
        "none",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--lr-decay-epoch",
        "1",
    ]


def train_cli(dataset, *extra: str, base: bool = True) -> int:
    """`fti4cir train` in-process, on the CPU; base=False gives only `extra` (as for a plain --resume)."""
    return run_subcommand(train_command, ["train", *extra, "--device", "cpu", *(run_args(dataset) if base else [])])


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / trainer.FINAL_WEIGHTS))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ: {different[:5]}"


def log_without_times(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (run / trainer.LOG).read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def straight_run(cached, tmp_path_factory):
    """Two epochs in one go from cached features; the reference every interrupted run must reproduce exactly."""
    run = tmp_path_factory.mktemp("straight") / "run"
    with visual_tower_disabled():
        assert train_cli(cached, "--out", str(run), "--epochs", "2") == 0
    return run


# ---- data -------------------------------------------------------------------------------------------------------
def test_pairs_resolve_to_cached_features_of_any_layout(tmp_path, tiny_model):
    images = tmp_path / "flat"
    images.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "b.png", "c.jpg", "changed.png"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.jpg").write_bytes(b"not a picture")
    records = [
        {"image": "a.jpg", "sha1": sha1(images / "a.jpg"), "subject": "a cat", "attribute": "on a mat"},
        {"image": "b.png", "subject": "a dog", "attribute": "in the snow"},  # no hash: hashed here
        {"image": "a.jpg", "sha1": sha1(images / "a.jpg"), "subject": "a cat", "attribute": "asleep"},
        {"image": "missing.jpg", "sha1": "0" * 40, "subject": "x", "attribute": "y"},
        {"image": "broken.jpg", "subject": "x", "attribute": "y"},
        {"image": "changed.png", "sha1": "f" * 40, "subject": "x", "attribute": "y"},
        {"image": "c.jpg", "subject": "a bird", "attribute": "on a branch"},
    ]
    pairs = write_pairs(tmp_path / "pairs.jsonl", records)
    store = FeatureStore.for_model(tmp_path / "cache", tiny_model, with_patches=True)
    data = prepare_training_data(tiny_model, images, pairs, store, progress=False)
    assert data.images == ["a.jpg", "b.png", "a.jpg", "c.jpg"]
    assert data.subjects == ["a cat", "a dog", "a cat", "a bird"]
    assert data.dropped == {"missing_file": 1, "unreadable": 1, "changed_since_captioning": 1}
    assert data.rows[0] == data.rows[2] and len(set(data.rows.tolist())) == 3
    batch = data.batch([1, 3])
    expected = tiny_model.backbone.encode_visual(
        tiny_model.preprocess([load_image(images / "b.png"), load_image(images / "c.jpg")])
    )
    torch.testing.assert_close(batch.visual.global_features, expected.global_features, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(batch.visual.patch_tokens, expected.patch_tokens, atol=2e-2, rtol=2e-3)
    assert batch.visual.patch_tokens.dtype == torch.float32 and batch.attributes == ["in the snow", "on a branch"]


def test_bad_pairs_files_are_reported(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "p.jsonl").write_text('{"image": "a.jpg", "subject": "a", "attribute": "b"}\n{"image": "b.jpg"}\n')
    with pytest.raises(UserError, match="line 2 needs"):
        read_pairs(tmp_path / "p.jsonl")
    (tmp_path / "p.jsonl").write_text("\n{oops\n")
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_pairs(tmp_path / "p.jsonl")


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = epoch_batches(50, 8, seed=3, epoch=1)
    assert a.shape == (6, 8) and len(set(a.ravel().tolist())) == 48
    np.testing.assert_array_equal(a, epoch_batches(50, 8, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_batches(50, 8, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_batches(50, 8, seed=4, epoch=1))


# ---- training ---------------------------------------------------------------------------------------------------
def test_training_from_cached_features_learns(straight_run):
    """The straight run (visual tower disabled throughout) wrote its log, final weights and one checkpoint."""
    log = [json.loads(line) for line in (straight_run / trainer.LOG).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["steps"] == 3 for r in log)
    assert log[1]["loss"] < log[0]["loss"]
    for r in log:
        assert r["loss"] == pytest.approx(r["contrastive"] + r["orthogonal"] + 1.4 * r["regularisation"], rel=1e-6)
    initial = create_model("fti4cir-tiny", None, device="cpu", seed=0).inversion.state_dict()
    trained = weights_of(straight_run)
    assert initial.keys() == trained.keys()
    assert not torch.equal(trained["subject_mapper.0.weight"], initial["subject_mapper.0.weight"])
    meta = json.loads((straight_run / "fti4cir.json").read_text())
    assert meta["backbone"] == "fti4cir-tiny" and meta["extra"]["training"]["steps"] == 6
    assert [p.name for p in straight_run.glob("checkpoint-*")] == ["checkpoint-000000006.safetensors"]


def test_reg_weight_sets_the_regularisation_term_and_is_recorded(no_visual_tower, tmp_path):
    run = tmp_path / "run"
    assert train_cli(no_visual_tower, "--out", str(run), "--epochs", "1", "--reg-weight", "3.0") == 0
    (record,) = [json.loads(line) for line in (run / trainer.LOG).read_text().splitlines()]
    assert record["loss"] == pytest.approx(
        record["contrastive"] + record["orthogonal"] + 3.0 * record["regularisation"]
    )
    assert json.loads((run / "fti4cir.json").read_text())["reg_weight"] == 3.0


def test_subject_weight_is_used_and_recorded(no_visual_tower, tmp_path):
    runs = {}
    for flags in ((), ("--subject-weight", "4.0")):
        run = tmp_path / f"run{len(runs)}"
        assert train_cli(no_visual_tower, "--out", str(run), "--epochs", "1", *flags) == 0
        runs[flags] = (json.loads((run / "fti4cir.json").read_text()), json.loads((run / trainer.LOG).read_text()))
    (plain, plain_log), (weighted, weighted_log) = runs.values()
    assert plain["subject_weight"] == 1.0 and weighted["subject_weight"] == 4.0
    # the same first step, a larger regularisation: the subject-wise sentence counts four times
    assert weighted_log["regularisation"] > plain_log["regularisation"]


@pytest.mark.parametrize("flag", ["--reg-weight", "--subject-weight"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "the value must be in [0, 1e+06], not -1"),
        ("2e6", "the value must be in [0, 1e+06], not 2e+06"),  # the weights file's loader would refuse it
        ("nan", "the value must be finite, not nan"),
        ("inf", "the value must be finite, not inf"),
    ],
)
def test_loss_weights_take_only_what_the_weights_file_loads(no_visual_tower, tmp_path, capsys, flag, value, message):
    from fti4cir.cli import main

    run = tmp_path / "run"
    argv = ["train", *run_args(no_visual_tower), "--device", "cpu", "--out", str(run), f"{flag}={value}"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2  # argparse's usage error, before anything is written
    assert f"argument {flag}: {message}" in capsys.readouterr().err
    assert not run.exists()


def test_resume_after_one_epoch_is_bit_for_bit(straight_run, no_visual_tower, tmp_path):
    run = tmp_path / "run"
    assert train_cli(no_visual_tower, "--out", str(run), "--epochs", "1") == 0
    assert train_cli(no_visual_tower, "--out", str(run), "--resume", "--epochs", "2", base=False) == 0
    assert_same_weights(straight_run, run)
    assert log_without_times(straight_run) == log_without_times(run)
    assert [r["lr"] for r in log_without_times(run)] == [1e-3, pytest.approx(1e-4)]


def train_then_die(where: str, at: int, argv: list[str]) -> None:
    """In a forked child: run `fti4cir train` and SIGKILL itself right after step `at`, or right before committing
    the checkpoint of step `at` (its tensors file already written)."""
    step, commit, calls = trainer.train_step, loop.write_json_atomic, [0]

    def killing_step(*args, **kwargs):
        out = step(*args, **kwargs)
        calls[0] += 1
        if where == "step" and calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    def killing_commit(path, record, **kwargs):
        if where == "commit" and record["global_step"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(path, record, **kwargs)

    trainer.train_step, loop.write_json_atomic = killing_step, killing_commit  # the child's copies of the modules
    run_subcommand(train_command, argv)


@pytest.mark.parametrize("where, at, committed", [("step", 5, 4), ("commit", 4, 3)])
def test_sigkill_mid_epoch_then_resume_completes_identically(
    straight_run, no_visual_tower, tmp_path, where, at, committed
):
    """A trainer process killed after step 5 (last checkpoint: step 4, mid epoch 2) or while committing the step-4
    checkpoint; resuming gives exactly the uninterrupted run."""
    run = tmp_path / "run"
    argv = [
        "train",
        "--out",
        str(run),
        "--epochs",
        "2",
        "--checkpoint-steps",
        "2",
        "--device",
        "cpu",
        *run_args(no_visual_tower),
    ]
    child = multiprocessing.get_context("fork").Process(target=train_then_die, args=(where, at, argv))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    record = trainer.read_checkpoint(run)
    assert record["global_step"] == committed and (run / record["tensors"]).exists()
    assert not (run / trainer.FINAL_WEIGHTS).exists()
    assert train_cli(no_visual_tower, "--out", str(run), "--resume", base=False) == 0
    assert_same_weights(straight_run, run)
    assert log_without_times(straight_run) == log_without_times(run)
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-000000006.safetensors"]


def test_existing_run_needs_resume_and_matching_settings(straight_run, cached, tmp_path):
    with pytest.raises(UserError, match="--resume"):
        train_cli(cached, "--out", str(straight_run), "--epochs", "2")
    with pytest.raises(UserError, match="lr: checkpoint 0.001, now 0.5"):
        train_cli(cached, "--out", str(straight_run), "--resume", "--lr", "0.5", base=False)
    with pytest.raises(UserError, match="--images and --pairs"):
        train_cli(cached, "--out", str(straight_run.parent / "fresh"), base=False)
    records = read_pairs(cached["pairs"])
    records[0]["attribute"] = "something else"
    changed = write_pairs(tmp_path / "changed.jsonl", records)
    with pytest.raises(UserError, match="changed since the checkpoint"):
        train_cli(cached, "--out", str(straight_run), "--resume", "--epochs", "3", "--pairs", str(changed), base=False)


# ---- learning on real photos ------------------------------------------------------------------------------------
def self_retrieval(model, visual) -> dict[str, float]:
    """Each image's own pseudo sentence "a photo of * with * ..." as the query, the images' global features as the
    gallery: Recall@1/@5 of the image itself."""
    model.inversion.eval()
    with torch.no_grad():
        queries = torch.nn.functional.normalize(pseudo_sentence_features(model.backbone, model.invert(visual)), dim=-1)
    gallery = torch.nn.functional.normalize(visual.global_features, dim=-1)
    scores = queries @ gallery.T
    rank = (scores > scores.diagonal().unsqueeze(1)).sum(dim=1)
    return {f"R@{k}": float((rank < k).float().mean()) for k in (1, 5)}


def test_training_on_photos_raises_held_out_self_retrieval(tmp_path):
    """800 ImageNet photos train the tiny random model; 200 others are held out.

    Pairs come from the file names (`<wnid>_<class name>.jpg`): subject = the class name, attribute = "a natural
    scene" for all (the tiny random BLIP's captions would be noise). lr 2e-3 instead of 4e-5 and batch 16, so that
    five epochs suffice; chance level is R@1 0.005, R@5 0.025."""
    photos = list_images(shared_data("photos", "imagenet-sample"))
    assert len(photos) >= 1000
    photos = photos[:1000]
    held_out = photos[4::5]
    training = [p for i, p in enumerate(photos) if i % 5 != 4]
    pairs = write_pairs(
        tmp_path / "pairs.jsonl",
        [
            {"image": p.name, "subject": p.stem.split("_", 1)[1].replace("_", " "), "attribute": "a natural scene"}
            for p in training
        ],
    )
    config = trainer.TrainConfig(
        images=str(photos[0].parent),
        pairs=str(pairs),
        out=str(tmp_path / "run"),
        backbone="fti4cir-tiny",
        pretrained=None,
        cache_dir=str(tmp_path / "cache"),
        epochs=5,
        batch_size=16,
        lr=2e-3,
    )
    model = create_model(config.model_spec("cpu"))
    store = FeatureStore.for_model(config.cache_dir, model, with_patches=True)
    visual = store.get(extract_features(model, held_out, store, progress=False).rows)
    before = self_retrieval(model, visual)

    result = trainer.train(config, device="cpu", progress=False)
    assert result.pairs_used == 800
    model.inversion = load_weights(result.weights)
    after = self_retrieval(model, visual)
    losses = [r["loss"] for r in result.history]
    print(f"held-out self-retrieval before {before}, after {after}; epoch losses {losses}")
    assert losses[-1] < losses[0]
    assert after["R@5"] >= 0.075 and after["R@5"] >= before["R@5"] + 0.05
