"""The shared command line of ``data_prep/shard_coco.py`` and ``shard_mpii.py``
(``pnfs/data/shards/cli.py``): its options and defaults, the split from the file name, every
refusal (exit 2, one ``error:`` line naming the value), the summary it prints and ``--verify``.

Issue 26 part 6 (docs/testing.md): written for the module's mutation run; the records come
from a stand-in reader, so each test runs in well under a second."""

from __future__ import annotations

import json

import pytest

from pnfs.data.shards.cli import EXIT_BAD_INPUT, common_parser, fail, infer_split, run
from pnfs.data.shards.writer import MANIFEST
from tests.data.shards.test_writer import _record


@pytest.fixture
def folder(tmp_path):
    """``images/a.png`` (128x96) and an annotation file the stand-in reader ignores."""
    import cv2
    import numpy as np

    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.full((128, 96, 3), 90, np.uint8))
    (tmp_path / "person_keypoints_val.json").write_text("{}")
    return tmp_path


def _args(folder, *extra):
    return common_parser("d").parse_args(
        ["--images", str(folder / "images"), "--annotations", str(folder / "person_keypoints_val.json"),
         "--out", str(folder / "out"), "--no-progress", *extra]
    )  # fmt: skip


def _reader(records, total=None):
    """A stand-in for the COCO/MPII reader: records, one skipped and one filtered person."""

    def read(skipped, filtered):
        skipped.add("bad_coordinates", "5_50")
        filtered.add("iscrowd", "6_60")
        return records, total if total is not None else len(records) + 2

    return read


def _run(folder, *extra, records=None, clip_box=True):
    records = [_record(1), _record(2)] if records is None else records
    return run(_args(folder, *extra), "coco17", _reader(records), clip_box, ["prog", "--x"])


def test_the_options_and_their_defaults():
    args = common_parser("Shard it.").parse_args(["--images", "i", "--annotations", "a.json", "--out", "o"])
    assert vars(args) == {
        "images": "i", "annotations": "a.json", "out": "o", "split": None, "shard_size": 512, "workers": 1,
        "max_side": 768, "margin": 1.25, "max_scale": 1.3, "aspect_range": [0.75, 1.0], "quality": 94,
        "overwrite": False, "verify": False, "no_progress": False,
    }  # fmt: skip
    args = common_parser("d").parse_args(
        ["--images", "i", "--annotations", "a", "--out", "o", "--split", "s", "--shard-size", "3",
         "--workers", "2", "--max-side", "0", "--margin", "1.5", "--max-scale", "2", "--aspect-range",
         "0.5", "2", "--quality", "80", "--overwrite", "--verify", "--no-progress"]
    )  # fmt: skip
    assert vars(args) == {
        "images": "i", "annotations": "a", "out": "o", "split": "s", "shard_size": 3, "workers": 2,
        "max_side": 0, "margin": 1.5, "max_scale": 2.0, "aspect_range": [0.5, 2.0], "quality": 80,
        "overwrite": True, "verify": True, "no_progress": True,
    }  # fmt: skip
    parser = common_parser("Shard it.")
    assert parser.description == "Shard it."
    assert "output folder for <split>-%06d.tar + manifest.json" in " ".join(parser.format_help().split())


def test_the_three_paths_are_required(capsys):
    with pytest.raises(SystemExit) as e:
        common_parser("d").parse_args([])
    assert e.value.code == 2
    assert "the following arguments are required: --images, --annotations, --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, split",
    [("person_keypoints_train2017.json", "train"), ("person_keypoints_val2017.json", "val"),
     ("VALID.json", "val"), ("TrainVal.json", "train"), ("test.json", "data"),
    ("/d/train/val/ann.json", "data"),
     ("/d/x/MPII_Train.json", "train")],
)  # fmt: skip
def test_the_split_comes_from_the_annotation_file_name(name, split):
    assert infer_split(name) == split


def test_fail_prints_one_error_line_and_exits_2(capsys):
    assert EXIT_BAD_INPUT == 2
    with pytest.raises(SystemExit) as e:
        fail("the reason")
    assert e.value.code == 2 and capsys.readouterr() == ("", "error: the reason\n")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quality", "0"], "--quality must be in 1..100, got 0"),
        (["--quality", "101"], "--quality must be in 1..100, got 101"),
        (["--aspect-range", "0", "1"], "--aspect-range must be 0 < LO <= HI, got [0.0, 1.0]"),
        (["--aspect-range", "1.2", "1"], "--aspect-range must be 0 < LO <= HI, got [1.2, 1.0]"),
        (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    ],
)
def test_a_bad_option_is_refused_naming_its_value(folder, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        _run(folder, *extra)
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert not (folder / "out").exists()


@pytest.mark.parametrize(
    "extra", [["--quality", "1"], ["--quality", "100"], ["--aspect-range", "1", "1"], ["--shard-size", "1"]]
)
def test_the_edges_of_the_options_are_taken(folder, extra):
    assert _run(folder, *extra) == 0


def test_missing_paths_and_unreadable_annotations_are_named(folder, capsys):
    def refused(*args, read=None):
        with pytest.raises(SystemExit) as e:
            run(common_parser("d").parse_args([*args, "--out", str(folder / "out")]), "coco17",
                read or _reader([]), True, [])  # fmt: skip
        assert e.value.code == 2
        return capsys.readouterr().err

    ann, images = str(folder / "person_keypoints_val.json"), str(folder / "images")
    assert refused("--images", images, "--annotations", str(folder / "no.json")) == (
        f"error: annotation file not found: {folder / 'no.json'}\n"
    )
    assert (
        refused("--images", images, "--annotations", images)
        == f"error: annotation file not found: {images}\n"
    )
    assert refused("--images", str(folder / "none"), "--annotations", ann) == (
        f"error: image folder not found: {folder / 'none'}\n"
    )
    assert refused("--images", ann, "--annotations", ann) == f"error: image folder not found: {ann}\n"
    for error in (ValueError("not json"), OSError("disk")):

        def read(skipped, filtered, error=error):
            raise error

        assert refused("--images", images, "--annotations", ann, read=read) == (
            f"error: cannot read annotations {ann}: {error}\n"
        )


def test_the_run_writes_the_options_it_was_given_and_prints_a_summary(folder, capsys):
    records = [
        _record(1),
        _record(2, image_file="gone.png", image_id=2),
        _record(3),
        _record(4, image_id=3, image_file="gone.png"),
    ]
    records += [_record(5, image_id=4, image_file="gone.png"), _record(6, image_id=5, image_file="gone.png")]
    extra = ["--shard-size", "4", "--max-side", "50", "--margin", "1.5", "--max-scale", "1.1",
             "--aspect-range", "0.5", "1.5", "--quality", "70"]  # fmt: skip
    assert _run(folder, *extra, records=records, clip_box=False) == 0
    out = folder / "out"
    entry = json.loads((out / MANIFEST).read_text())["splits"]["val"]  # split from the file name
    assert entry["options"] == {"shard_size": 4, "max_side": 50, "margin": 1.5, "max_scale": 1.1,
                                "aspect_range": [0.5, 1.5], "clip_box": False, "quality": 70}  # fmt: skip
    assert entry["joint_set"] == "coco17" and entry["command"] == "prog --x"
    assert entry["counts"] == {"annotations": 8, "records": 6, "samples": 2, "skipped": 5, "filtered": 1}
    assert capsys.readouterr() == (
        f"val: 2 samples in 2 shards -> {out} (5 skipped, 1 filtered)\n"
        "  skipped bad_coordinates: 1 (first: 5_50)\n"
        "  skipped missing_image: 4 (first: 2_2, 3_4, 4_5)\n",
        "",
    )
    assert _run(folder, "--split", "mine", "--verify") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "verify: 1 shards OK"
    assert (out / "mine-000000.tar").exists()


def test_other_inputs_are_refused_then_overwritten_and_verify_fails_on_a_bad_shard(folder, capsys):
    assert _run(folder) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _run(folder, "--margin", "1.5")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(
        f"error: {folder / 'out'} holds 'val' shards written from other"
    )
    assert _run(folder, "--margin", "1.5", "--overwrite") == 0
    tar = folder / "out" / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    capsys.readouterr()
    assert _run(folder, "--margin", "1.5", "--verify") == 1
    out, err = capsys.readouterr()
    assert "verify:" not in out and err.splitlines()[0] == f"verify: {tar}: sha256 differs from the manifest"


def test_the_aspect_range_takes_two_values_named_lo_and_hi():
    usage = " ".join(common_parser("d").format_usage().split())
    assert "[--aspect-range LO HI]" in usage


def test_the_progress_bar_shows_unless_no_progress_and_workers_reach_the_writer(folder, monkeypatch, capsys):
    from pnfs.data.shards import writer
    from tests.data.shards.test_writer import _StandInPool

    args = common_parser("d").parse_args(
        ["--images", str(folder / "images"), "--annotations", str(folder / "person_keypoints_val.json"),
         "--out", str(folder / "out"), "--shard-size", "1", "--workers", "2"]
    )  # fmt: skip
    calls: list = []
    monkeypatch.setattr(writer, "get_context", _StandInPool(calls))
    assert run(args, "coco17", _reader([_record(1), _record(2)]), True, []) == 0
    assert calls == [("context", "spawn"), ("processes", 2), ("tasks", [0, 1])]
    assert "shards val: 100%" in capsys.readouterr().err


def test_each_option_says_what_it_does_in_help():
    helps = {a.option_strings[-1]: a.help for a in common_parser("d")._actions}
    assert helps == {
        "--help": "show this help message and exit",
        "--images": "folder holding the images",
        "--annotations": "annotation json",
        "--out": "output folder for <split>-%%06d.tar + manifest.json",
        "--split": "split name (default: train/val from the annotation name)",
        "--shard-size": "samples per shard (default 512)",
        "--workers": "processes writing shards in parallel",
        "--max-side": "longest crop side in px (0: never downscale)",
        "--margin": "box margin the crops must cover",
        "--max-scale": "largest augmentation scale to cover",
        "--aspect-range": "input width/height ratios the crops must cover "
        "(default 0.75 1.0: 256x192 .. square)",
        "--quality": "JPEG quality of the crops (4:4:4 chroma)",
        "--overwrite": "replace shards of the split in --out that were written from other annotations, "
        "records or options (without it such a folder is refused, exit 2); shards written from the same "
        "inputs are always reused, so an interrupted run resumes",
        "--verify": "re-read every shard after writing",
        "--no-progress": "no progress bar",
    }
