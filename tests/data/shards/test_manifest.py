"""pnfs.data.shards.manifest on hand-made shards and manifests (docs/data.md): which shard a
problem names, each check at its edge, and the coverage warning at the limits of the crops.

The shards are small tars written here with ``tarfile`` and the expected sha256 comes from
``hashlib``, so no expectation is computed by the code under test."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import pytest

from pnfs.data.shards.manifest import check_coverage, check_manifest


def write_shard(path: Path, samples: int, payload: bytes = b"{}") -> Path:
    """A tar of ``samples`` samples, each one ``<key>.json`` member holding ``payload``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def entry(path: Path, samples: int, **fields) -> dict:
    """A manifest entry that matches ``path`` (its size and sha256), with ``fields`` overriding."""
    out = {
        "file": path.name,
        "samples": samples,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    out.update(fields)
    return {k: v for k, v in out.items() if v is not None}


def write_manifest(folder: Path, splits: dict) -> Path:
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"splits": splits}))
    return manifest


def flip_one_byte(path: Path) -> None:
    """Change the last payload byte of a shard, keeping its size (and its tar headers)."""
    data = bytearray(path.read_bytes())
    at = data.rindex(b"}")
    data[at] = ord("]")
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- check_manifest


def test_a_matching_manifest_has_no_problems_with_or_without_sha256(tmp_path):
    a, b = write_shard(tmp_path / "val-000000.tar", 3), write_shard(tmp_path / "val-000001.tar", 2)
    write_manifest(tmp_path, {"val": {"shards": [entry(a, 3), entry(b, 2)]}})
    assert check_manifest([str(a), str(b)], verify=False) == []
    assert check_manifest([str(a), str(b)], verify=True) == []


def test_a_size_difference_names_the_shard_its_size_and_the_manifests(tmp_path):
    a, b = write_shard(tmp_path / "val-000000.tar", 3), write_shard(tmp_path / "val-000001.tar", 2)
    listed_bytes = b.stat().st_size + 512
    manifest = write_manifest(tmp_path, {"val": {"shards": [entry(a, 3), entry(b, 2, bytes=listed_bytes)]}})
    assert check_manifest([str(a), str(b)], verify=False) == [
        f"{b}: {b.stat().st_size} bytes, {manifest} lists {listed_bytes}"
    ]


def test_a_sample_count_difference_is_named_when_the_size_is_right_or_not_listed(tmp_path):
    a, b = write_shard(tmp_path / "val-000000.tar", 3), write_shard(tmp_path / "val-000001.tar", 2)
    manifest = write_manifest(
        tmp_path, {"val": {"shards": [entry(a, 4), entry(b, 1, bytes=None)]}}
    )  # a: right size, one sample short; b: an older manifest without "bytes"
    assert check_manifest([str(a), str(b)], verify=False) == [
        f"{a}: 3 samples, {manifest} lists 4",
        f"{b}: 2 samples, {manifest} lists 1",
    ]


def test_a_wrong_size_is_named_once_not_again_for_its_samples(tmp_path):
    a = write_shard(tmp_path / "val-000000.tar", 3)
    manifest = write_manifest(tmp_path, {"val": {"shards": [entry(a, 9, bytes=1)]}})
    assert check_manifest([str(a)], verify=False) == [f"{a}: {a.stat().st_size} bytes, {manifest} lists 1"]


def test_an_entry_without_counts_checks_nothing_but_its_sha256(tmp_path):
    a = write_shard(tmp_path / "val-000000.tar", 3)
    manifest = write_manifest(tmp_path, {"val": {"shards": [entry(a, None, bytes=None, sha256="0" * 64)]}})
    assert check_manifest([str(a)], verify=False) == []
    assert check_manifest([str(a)], verify=True) == [f"{a}: sha256 differs from {manifest}"]


def test_sha256_is_checked_only_when_asked_and_only_where_listed(tmp_path):
    """data.verify_shards: same size, same samples, one byte changed."""
    a, b, c = (write_shard(tmp_path / f"val-{i:06d}.tar", 2) for i in range(3))
    listed = [entry(a, 2), entry(b, 2), entry(c, 2, sha256=None)]
    manifest = write_manifest(tmp_path, {"val": {"shards": listed}})
    flip_one_byte(b)
    flip_one_byte(c)  # its entry has no sha256: nothing to compare with
    paths = [str(a), str(b), str(c)]
    assert check_manifest(paths, verify=False) == []
    assert check_manifest(paths, verify=True) == [f"{b}: sha256 differs from {manifest}"]


def test_a_size_and_a_sha256_problem_of_one_shard_are_both_named(tmp_path):
    a = write_shard(tmp_path / "val-000000.tar", 2)
    listed = entry(a, 2, bytes=a.stat().st_size + 1, sha256="f" * 64)
    manifest = write_manifest(tmp_path, {"val": {"shards": [listed]}})
    assert check_manifest([str(a)], verify=True) == [
        f"{a}: {a.stat().st_size} bytes, {manifest} lists {a.stat().st_size + 1}",
        f"{a}: sha256 differs from {manifest}",
    ]


def test_every_split_of_the_manifest_is_listed(tmp_path):
    train = write_shard(tmp_path / "train-000000.tar", 2)
    val = write_shard(tmp_path / "val-000000.tar", 2)
    manifest = write_manifest(
        tmp_path, {"train": {"shards": [entry(train, 2)]}, "val": {"shards": [entry(val, 5)]}}
    )
    assert check_manifest([str(train), str(val)], verify=False) == [f"{val}: 2 samples, {manifest} lists 5"]


def test_a_split_without_a_shard_list_is_passed_over(tmp_path):
    a = write_shard(tmp_path / "val-000000.tar", 2)
    manifest = write_manifest(tmp_path, {"train": {"options": CROPS}, "val": {"shards": [entry(a, 3)]}})
    assert check_manifest([str(a)], verify=False) == [f"{a}: 2 samples, {manifest} lists 3"]


def test_an_unlisted_shard_is_passed_over_and_the_next_one_still_checked(tmp_path):
    extra = write_shard(tmp_path / "val-000000.tar", 2)  # sorts first, not in the manifest
    b = write_shard(tmp_path / "val-000001.tar", 2)
    manifest = write_manifest(tmp_path, {"val": {"shards": [entry(b, 3)]}})
    assert check_manifest([str(extra), str(b)], verify=False) == [f"{b}: 2 samples, {manifest} lists 3"]


@pytest.mark.parametrize("manifest_text", [None, "{not json", '{"splits": {}}', "{}"])
def test_a_folder_without_a_usable_manifest_is_passed_over_for_the_next_folder(tmp_path, manifest_text):
    first = write_shard(tmp_path / "a" / "val-000000.tar", 2)
    if manifest_text is not None:
        (tmp_path / "a" / "manifest.json").write_text(manifest_text)
    second = write_shard(tmp_path / "b" / "val-000000.tar", 2)
    manifest = write_manifest(tmp_path / "b", {"val": {"shards": [entry(second, 7)]}})
    assert check_manifest([str(first), str(second)], verify=False) == [
        f"{second}: 2 samples, {manifest} lists 7"
    ]


def test_two_folders_with_the_same_shard_names_are_each_checked_against_their_own_manifest(tmp_path):
    """Same file name, other content: the problem names the shard of the folder it is in."""
    good = write_shard(tmp_path / "a" / "val-000000.tar", 2)
    write_manifest(tmp_path / "a", {"val": {"shards": [entry(good, 2)]}})
    bad = write_shard(tmp_path / "b" / "val-000000.tar", 3, payload=b'{"x": 1}')
    manifest_b = write_manifest(tmp_path / "b", {"val": {"shards": [entry(bad, 3)]}})
    flip_one_byte(bad)
    paths = [str(good), str(bad)]
    assert check_manifest(paths, verify=True) == [f"{bad}: sha256 differs from {manifest_b}"]
    # each folder once, even when its shards come interleaved with the other folder's
    other = write_shard(tmp_path / "a" / "val-000001.tar", 1)
    manifest_a = write_manifest(tmp_path / "a", {"val": {"shards": [entry(good, 2), entry(other, 4)]}})
    assert check_manifest([str(good), str(bad), str(other)], verify=False) == [
        f"{other}: 1 samples, {manifest_a} lists 4"
    ]


def test_urls_are_not_checked(tmp_path):
    a = write_shard(tmp_path / "val-000000.tar", 2)
    manifest = write_manifest(tmp_path, {"val": {"shards": [entry(a, 5)]}})
    url = "http://127.0.0.1:9/val-000000.tar"
    assert check_manifest([url, str(a)], verify=True) == [f"{a}: 2 samples, {manifest} lists 5"]
    assert check_manifest([url], verify=True) == []


def test_a_shard_index_gives_the_sample_count(tmp_path):
    """The ``.idx`` beside a shard (DALI's index) is what is counted when it exists."""
    a = write_shard(tmp_path / "val-000000.tar", 2)
    a.with_suffix(".idx").write_text("v1.2 1\njson 512 2 000000.json\n")
    manifest = write_manifest(tmp_path, {"val": {"shards": [entry(a, 2)]}})
    assert check_manifest([str(a)], verify=False) == [f"{a}: 1 samples, {manifest} lists 2"]


# ----------------------------------------------------------------------------- check_coverage


def coverage_folder(tmp_path: Path, split: str = "val", options: dict | None = None) -> list[str]:
    shard = write_shard(tmp_path / f"{split}-000000.tar", 1)
    other = write_shard(tmp_path / f"{split}-000001.tar", 1)
    splits = {split: {"shards": [entry(shard, 1), entry(other, 1)]}}
    if options is not None:
        splits[split]["options"] = options
    write_manifest(tmp_path, splits)
    return [str(shard), str(other)]


def coverage_warnings(paths, scale_range, input_size) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_coverage(paths, scale_range=scale_range, input_size=input_size)
    return list(caught)


CROPS = {"max_scale": 1.3, "aspect_range": [0.75, 1.0]}


def test_coverage_warning_names_the_manifest_the_crops_and_the_settings(tmp_path):
    paths = coverage_folder(tmp_path, options=CROPS)
    (w,) = coverage_warnings(paths, scale_range=(0.7, 1.5), input_size=(64, 48))
    assert w.category is UserWarning
    assert str(w.message) == (
        f"{tmp_path / 'manifest.json'}: crops cover scale <= 1.3 and input aspect 0.75..1.0, but "
        "data.scale_range=(0.7, 1.5), data.input_size=(64, 48): parts of the input will be "
        "black; re-shard with --max-scale / --aspect-range"
    )


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ,
    reason="mutmut's trampoline is one more frame between the caller and check_coverage",
)
def test_coverage_warning_points_at_the_caller_of_the_loader_builder(tmp_path):
    """stacklevel=3: check_coverage <- build_loader <- the line that built the loader."""
    paths = coverage_folder(tmp_path, options=CROPS)

    def build_loader_like():
        check_coverage(paths, scale_range=(0.7, 1.5), input_size=(64, 48))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_loader_like()
        line = build_loader_like.__code__.co_firstlineno + 5  # the call just above
    (w,) = caught
    assert (w.filename, w.lineno) == (__file__, line)


@pytest.mark.parametrize(
    ("scale_hi", "warns"),
    [(1.3, False), (1.3 + 1e-9, False), (1.3 + 1e-6, True), (1.2, False)],
)
def test_coverage_scale_at_the_crops_max_scale(tmp_path, scale_hi, warns):
    """The largest scale of ``data.scale_range`` against the crops' max_scale (1e-9 tolerance)."""
    paths = coverage_folder(tmp_path, options=CROPS)
    assert len(coverage_warnings(paths, scale_range=(0.5, scale_hi), input_size=(64, 48))) == warns


def test_coverage_reads_the_largest_scale_not_the_smallest(tmp_path):
    paths = coverage_folder(tmp_path, options=CROPS)
    assert len(coverage_warnings(paths, scale_range=(0.5, 2.0), input_size=(64, 48))) == 1
    assert len(coverage_warnings(paths, scale_range=(2.0, 1.0), input_size=(64, 48))) == 0


@pytest.mark.parametrize(
    ("input_size", "warns"),
    [
        ((64, 48), False),  # w/h = 0.75, the low end
        ((64, 64), False),  # 1.0, the high end
        ((64, 47), True),  # just below
        ((64, 65), True),  # just above
        ((48, 64), True),  # h, w: 64/48 is outside, 48/64 would be inside
    ],
)
def test_coverage_aspect_at_the_ends_of_the_crops_range(tmp_path, input_size, warns):
    paths = coverage_folder(tmp_path, options=CROPS)
    assert len(coverage_warnings(paths, scale_range=(0.5, 1.0), input_size=input_size)) == warns


@pytest.mark.parametrize(("lo", "hi"), [(0.75 + 1e-9, 1.0), (0.75, 1.0 - 1e-9)])
def test_coverage_aspect_tolerance_is_one_nano(tmp_path, lo, hi):
    """The range's ends are compared with 1e-9 slack (a float written in the manifest)."""
    paths = coverage_folder(tmp_path, options={"max_scale": 1.3, "aspect_range": [lo, hi]})
    size = (64, 48) if lo > 0.75 else (64, 64)
    assert coverage_warnings(paths, scale_range=(0.5, 1.0), input_size=size) == []
    far = (
        {"max_scale": 1.3, "aspect_range": [lo + 1e-6, hi]}
        if lo > 0.75
        else {
            "max_scale": 1.3,
            "aspect_range": [lo, hi - 1e-6],
        }
    )
    write_manifest(tmp_path, {"val": {"shards": [], "options": far}})
    assert len(coverage_warnings(paths, scale_range=(0.5, 1.0), input_size=size)) == 1


def test_coverage_without_options_allows_any_scale_and_aspect(tmp_path):
    """Crops of a manifest that records no options: no limit to warn about."""
    paths = coverage_folder(tmp_path, options={})
    assert coverage_warnings(paths, scale_range=(0.1, 100.0), input_size=(64, 16)) == []
    assert coverage_warnings(paths, scale_range=(0.1, 100.0), input_size=(16, 640)) == []
    only_scale = coverage_folder(tmp_path / "s", options={"max_scale": 1.3})
    assert coverage_warnings(only_scale, scale_range=(0.1, 1.3), input_size=(64, 16)) == []
    only_aspect = coverage_folder(tmp_path / "a", options={"aspect_range": [0.75, 1.0]})
    assert coverage_warnings(only_aspect, scale_range=(0.1, 100.0), input_size=(64, 48)) == []


def test_coverage_reads_the_options_of_the_shards_own_split(tmp_path):
    """A split named with a dash (``coco-val``): the name is what comes before the last dash."""
    paths = coverage_folder(tmp_path, split="coco-val", options={"max_scale": 2.0})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["coco"] = {"shards": [], "options": {"max_scale": 1.0}}
    manifest["splits"]["000000.tar"] = {"shards": [], "options": {"max_scale": 1.0}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert coverage_warnings(paths, scale_range=(0.5, 1.5), input_size=(64, 48)) == []
    assert len(coverage_warnings(paths, scale_range=(0.5, 2.5), input_size=(64, 48))) == 1


@pytest.mark.parametrize("manifest_text", [None, "{not json", "{}", '{"splits": {}}'])
def test_coverage_is_silent_without_a_usable_manifest(tmp_path, manifest_text):
    shard = write_shard(tmp_path / "val-000000.tar", 1)
    if manifest_text is not None:
        (tmp_path / "manifest.json").write_text(manifest_text)
    assert coverage_warnings([str(shard)], scale_range=(0.1, 100.0), input_size=(64, 16)) == []


def test_coverage_is_not_checked_for_urls(tmp_path):
    """A remote manifest is not fetched just for the warning (the local one here is not theirs)."""
    coverage_folder(tmp_path, options=CROPS)
    url = "http://127.0.0.1:9/val-000000.tar"
    assert coverage_warnings([url], scale_range=(0.1, 100.0), input_size=(64, 16)) == []


def test_a_url_is_never_read_as_a_local_path_even_where_one_would_match(tmp_path, monkeypatch):
    """``http://host:9/val-000000.tar`` taken as a path has the parent ``http:/host:9``: a folder
    of that name here, with a manifest that would warn and a shard that would fail, is not read."""
    monkeypatch.chdir(tmp_path)
    lookalike = tmp_path / "http:" / "127.0.0.1:9"
    shard = write_shard(lookalike / "val-000000.tar", 2)
    write_manifest(lookalike, {"val": {"shards": [entry(shard, 5)], "options": CROPS}})
    url = "http://127.0.0.1:9/val-000000.tar"
    assert Path(url).parent.resolve() == lookalike  # the trap is set
    assert coverage_warnings([url], scale_range=(0.1, 100.0), input_size=(64, 16)) == []
    assert check_manifest([url], verify=True) == []
    # the local shard given by its relative path is checked once, the URL beside it not at all
    local = "http:/127.0.0.1:9/val-000000.tar"
    assert check_manifest([url, local], verify=False) == [
        f"{local}: 2 samples, {Path('http:/127.0.0.1:9/manifest.json')} lists 5"
    ]
