"""`fti4cir demo-rebuild --quick`: every stage of the demo pipeline runs on a few committed photos, a rerun skips
what is done, and the outputs load as a model, a gallery and a benchmark table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fti4cir.cli import main
from fti4cir.demo.rebuild import STAGES
from fti4cir.demo.world import COLOURS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "quick"
    assert (
        main(["demo-rebuild", "--quick", "--out", str(out), "--photos", str(REPO / "data" / "clothing"), "--quiet"])
        == 0
    )
    return out


def test_every_stage_ran_and_wrote_its_output(quick_run):
    timings = json.loads((quick_run / "timings.json").read_text())
    assert list(timings) == list(STAGES)
    zero_shot = json.loads((quick_run / "zero-shot.json").read_text())
    assert 0 <= zero_shot["class_accuracy"] <= 1 and len(zero_shot["class_confusion"]) == 10
    methods = json.loads((quick_run / "evaluate" / "results.json").read_text())["methods"]
    assert set(methods) == {"fti4cir", "subject-only", "image-only", "text-only", "image+text", "m2c", "m2c+compose"}
    assert all(set(m["by_type"]) == {"colour", "class", "both"} for m in methods.values())
    words = json.loads((quick_run / "benchmark.json").read_text())["decoded_words"]
    assert words["photos"] == 60 and 0 <= words["subject_is_class"] <= 1
    pairs = (quick_run / "pairs-train.jsonl").read_text().splitlines()
    assert pairs and all(json.loads(p)["subject"] for p in pairs)


def test_training_stages_read_the_training_labels_and_measurements_labels_json(quick_run):
    """Captions, the CLIP and the triplets come from data/clothing/labels-v3.json (Settings.training_labels), for
    the run's photos only; zero-shot and the benchmark from the subset's labels.json."""
    from fti4cir.demo.benchmark import labels_digest
    from fti4cir.demo.labels import read_labels

    training = read_labels(quick_run / "training-labels.json")
    measured = read_labels(quick_run / "photos" / "labels.json")
    assert training["generator"]["version"] == 3 and measured["generator"]["version"] == 4
    assert [p["path"] for p in training["photos"]] == [p["path"] for p in measured["photos"]]
    assert json.loads((quick_run / "clip" / "clip.json").read_text())["labels_sha1"] == labels_digest(training)
    colours = {p["path"].split("/", 1)[1]: p["colour"] for p in training["photos"] if p["split"] == "train"}
    for line in (quick_run / "captions-train.jsonl").read_text().splitlines():
        record = json.loads(line)
        named = {c for c in COLOURS if c in record["caption"].replace(",", " ").split()}
        assert named <= {colours[record["image"]]}, record  # a caption names no colour but its training label's


def test_the_report_gives_every_measured_number_with_its_interval(quick_run):
    """The report `--install` writes beside the weights: zero-shot and decoded-word rates with Wilson intervals,
    and the goals' comparisons with paired-bootstrap intervals."""
    from fti4cir.demo.rebuild import Rebuild

    report = Rebuild(quick_run, progress=False).report()
    words = json.loads((quick_run / "benchmark.json").read_text())["decoded_words"]
    assert f"word for {words['subject_is_class']:.1%} (95% interval " in report
    assert "class accuracy" in report
    assert len(re.findall(r"95% interval \d+\.\d%-\d+\.\d%", report)) == 4  # class, colour, two word rates
    assert "| fti4cir - text-only |" in report and "| m2c+compose - m2c |" in report
    assert list(json.loads((quick_run / "timings.json").read_text())) == list(STAGES)
    assert all(re.search(rf"^\| {stage} \| \d+ \|$", report, re.M) for stage in STAGES)


def test_the_report_says_which_stages_this_folder_did_not_run(quick_run, tmp_path):
    """A run folder whose CLIP was copied in (its stage never ran there) reports it instead of leaving it out."""
    import shutil

    from fti4cir.demo.rebuild import Rebuild

    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy)
    timings = json.loads((copy / "timings.json").read_text())
    (copy / "timings.json").write_text(json.dumps({k: v for k, v in timings.items() if k != "clip"}))
    report = Rebuild(copy, progress=False).report()
    assert "| clip | not run in this folder |" in report
    assert re.search(r"^\| fti4cir \| \d+ \|$", report, re.M)


def test_a_rerun_skips_every_finished_stage(quick_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in quick_run.rglob("*") if p.is_file()}
    assert main(["demo-rebuild", "--quick", "--out", str(quick_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert all(f"[{stage}] done" in out for stage in STAGES)
    after = {p: p.stat().st_mtime_ns for p in quick_run.rglob("*") if p.is_file()}
    assert before == after


def test_a_retrained_network_reruns_the_stages_made_from_it(quick_run, capsys):
    """A newer FTI4CIR network (retrained after its folder was deleted) makes the fp16 copies, the gallery and the
    benchmark stale; the other stages stay done."""
    import os

    trained = quick_run / "fti4cir" / "fti4cir.safetensors"
    later = max(p.stat().st_mtime_ns for p in quick_run.rglob("*")) + 1  # newer than every output, not in the future
    os.utime(trained, ns=(later, later))
    assert main(["demo-rebuild", "--quick", "--out", str(quick_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    rerun = {stage for stage in STAGES if f"[{stage}] running" in out}
    assert rerun == {"compact", "gallery", "benchmark"}, out
    assert (quick_run / "clothing-fti4cir.safetensors").stat().st_mtime_ns > later
    assert main(["demo-rebuild", "--quick", "--out", str(quick_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert all(f"[{stage}] done" in out for stage in STAGES), out


def test_a_new_clip_retrains_the_networks_from_scratch(quick_run, capsys):
    """A CLIP newer than the networks (retrained after its folder was deleted) makes every stage made from it run
    again, and the training stages start afresh: their checkpoints of the old CLIP are removed, not resumed, also
    where a killed run left checkpoints without a finished network."""
    import os

    later = max(p.stat().st_mtime_ns for p in quick_run.rglob("*")) + 1
    os.utime(quick_run / "clip" / "clip.safetensors", ns=(later, later))
    (quick_run / "fti4cir" / "fti4cir.safetensors").unlink()  # killed mid-training: checkpoints, no network
    old_checkpoints = {quick_run / "fti4cir" / "old-checkpoint", quick_run / "m2c-stage1.run" / "old-checkpoint"}
    for marker in old_checkpoints:
        marker.write_text("of the old CLIP")
        os.utime(marker, ns=(later - 1, later - 1))
        os.utime(marker.parent, ns=(later - 1, later - 1))
    assert main(["demo-rebuild", "--quick", "--out", str(quick_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    rerun = {stage for stage in STAGES if f"[{stage}] running" in out}
    assert rerun == {"zero-shot", "fti4cir", "m2c-1", "m2c-2", "compact", "gallery", "benchmark"}, out
    assert not any(marker.exists() for marker in old_checkpoints)
    assert f"[m2c-2] removed {quick_run / 'm2c-stage2.done'}" in out
    trained = (quick_run / "fti4cir" / "fti4cir.safetensors", quick_run / "m2c-stage2.safetensors")
    assert all(path.stat().st_mtime_ns > later for path in trained)
    assert main(["demo-rebuild", "--quick", "--out", str(quick_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert all(f"[{stage}] done" in out for stage in STAGES), out


def test_install_refuses_quick_runs_and_unknown_stages(capsys):
    assert main(["demo-rebuild", "--quick", "--install"]) == 2
    assert main(["demo-rebuild", "--only", "clip,nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_install_writes_weights_that_name_the_installed_clip_and_a_gallery_of_them(quick_run, tmp_path):
    """The installed networks' configs name the CLIP file beside them, not the run folder they were trained in (a
    path on the machine that made them); their tensors are the run's; the gallery definition builds a gallery."""
    from safetensors import safe_open

    from fti4cir.demo.rebuild import CLIP_FILE, FTI4CIR_FILE, GALLERY, M2C_FILE, Rebuild, Settings
    from fti4cir.gallery import Gallery

    weights, galleries = tmp_path / "weights", tmp_path / "galleries"
    Rebuild(quick_run, REPO / "data" / "clothing", settings=Settings.quick(), progress=False).install(
        weights, galleries
    )
    assert (weights / CLIP_FILE).read_bytes() == (quick_run / "clip" / "clip.safetensors").read_bytes()
    for name in (FTI4CIR_FILE, M2C_FILE):
        config = json.loads((weights / name).with_suffix(".json").read_text())
        run_config = json.loads((quick_run / name).with_suffix(".json").read_text())
        assert config == {**run_config, "pretrained": CLIP_FILE} and run_config["pretrained"] != CLIP_FILE
        with safe_open(str(weights / name), "pt") as f, safe_open(str(quick_run / name), "pt") as g:
            assert [json.loads(v) for v in f.metadata().values()] == [config]
            assert sorted(f.keys()) == sorted(g.keys())
            assert all(f.get_tensor(k).equal(g.get_tensor(k)) for k in f.keys())
    definition = json.loads((galleries / f"{GALLERY}.json").read_text())
    assert definition["weights"] == f"../weights/{FTI4CIR_FILE}"
    assert len(Gallery.load(galleries / GALLERY)) == sum(1 for _ in (quick_run / "photos" / "test").rglob("*.jpg"))
