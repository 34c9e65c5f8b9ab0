"""MPII head sizes from HRNet's ``annot/gt_valid.mat``: the same PCKh as the json head sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pnfs.evaluate.mpii import head_sizes_from_gt_mat, load_mpii_ground_truth, main, pckh

scipy_io = pytest.importorskip("scipy.io")


def write_gt_valid_mat(path, annotations: list[dict], head_sizes: list[float]) -> None:
    """A gt_valid.mat in HRNet's layout: headboxes_src [2, 2, N] (top-left, bottom-right),
    jnt_missing [16, N], pos_gt_src [16, 2, N]. Each head box is a 3:4 rectangle around the
    person's head top whose diagonal is head_size / 0.6, so the file encodes the same sizes."""
    boxes = np.zeros((2, 2, len(annotations)))
    for i, (person, size) in enumerate(zip(annotations, head_sizes)):
        diagonal = size / 0.6
        w, h = 0.6 * diagonal, 0.8 * diagonal  # 3-4-5: sqrt(w^2 + h^2) == diagonal
        cx, cy = person["joints"][9]  # raw order: 9 = head top
        boxes[0, :, i] = (cx - w / 2, cy - h / 4)
        boxes[1, :, i] = (cx + w / 2, cy + 3 * h / 4)
    joints = np.stack([np.asarray(p["joints"], dtype=np.float64) for p in annotations], axis=-1)
    missing = np.stack([1 - np.asarray(p["joints_vis"]) for p in annotations], axis=-1)
    scipy_io.savemat(
        str(path),
        {
            "headboxes_src": boxes,
            "jnt_missing": missing,
            "pos_gt_src": joints,
            "dataset_joints": np.arange(16),
        },
    )


@pytest.fixture
def sample(shared_data, tmp_path):
    root = shared_data / "mpii_sample"
    annotations = root / "test_mpii.json"
    heads_json = root / "mpii_headsizes_pose-hg-train_valid_h5.json"
    sizes = [h["head_size"] for h in json.loads(heads_json.read_text())]
    mat = tmp_path / "gt_valid.mat"
    write_gt_valid_mat(mat, json.loads(annotations.read_text()), sizes)
    return annotations, heads_json, mat


def test_head_size_is_06_of_the_box_diagonal(tmp_path):
    boxes = np.zeros((2, 2, 2))
    boxes[1, :, 0] = (30.0, 40.0)  # diagonal 50
    boxes[0, :, 1], boxes[1, :, 1] = (10.0, 10.0), (16.0, 18.0)  # diagonal 10
    scipy_io.savemat(str(tmp_path / "g.mat"), {"headboxes_src": boxes})
    np.testing.assert_allclose(head_sizes_from_gt_mat(tmp_path / "g.mat", 2), [30.0, 6.0])


def test_pckh_is_the_same_from_the_mat_and_the_json(sample):
    annotations, heads_json, mat = sample
    from_json = load_mpii_ground_truth(annotations, heads_json)
    from_mat = load_mpii_ground_truth(annotations, mat)
    np.testing.assert_allclose(from_mat.head_size, from_json.head_size, rtol=1e-12)
    np.testing.assert_allclose(from_mat.head_size, [117.96, 78.48, 81.22], atol=0.005)
    # joints moved by graded fractions of the head size: PCKh at 0.5 / 0.1 is not trivially 0 or 100
    p, j = np.meshgrid(np.arange(3), np.arange(16), indexing="ij")
    frac = 0.05 + 0.1 * ((p + j) % 7)
    pred = from_json.joints + (frac * from_json.head_size[:, None])[..., None] * np.array([0.6, 0.8])
    for threshold in (0.5, 0.1):
        a = pckh(pred, from_json.joints, from_json.visible, from_json.head_size, threshold)[1]
        b = pckh(pred, from_mat.joints, from_mat.visible, from_mat.head_size, threshold)[1]
        assert 0 < a < 100 and a == b


def test_command_line_takes_the_mat(sample, tmp_path, capsys):
    annotations, heads_json, mat = sample
    gt = load_mpii_ground_truth(annotations, heads_json)
    pred = gt.joints + (0.3 * gt.head_size[:, None, None]) * np.array([0.6, 0.8])  # 0.3 head sizes off
    preds = tmp_path / "pred.json"
    preds.write_text(json.dumps([{"ann_id": i, "keypoints": pred[i].tolist()} for i in range(3)]))
    args = ["--annotations", str(annotations), "--predictions", str(preds), "--json"]
    metrics = []
    for heads in (heads_json, mat):
        assert main([*args, "--head-sizes", str(heads)]) == 0
        metrics.append(json.loads(capsys.readouterr().out))
    assert metrics[0] == metrics[1]
    assert metrics[0]["PCKh"] == 100.0 and metrics[0]["PCKh@0.1"] == 0.0


def test_a_mat_of_another_split_or_without_head_boxes_is_named(sample, tmp_path):
    annotations, _, _ = sample
    scipy_io.savemat(str(tmp_path / "short.mat"), {"headboxes_src": np.ones((2, 2, 2))})
    with pytest.raises(
        ValueError, match=r"data.val_head_sizes: .*short.mat.* 2 head boxes, the annotations 3"
    ):
        load_mpii_ground_truth(annotations, tmp_path / "short.mat")
    scipy_io.savemat(str(tmp_path / "none.mat"), {"jnt_missing": np.zeros((16, 3))})
    with pytest.raises(ValueError, match="no 'headboxes_src'"):
        load_mpii_ground_truth(annotations, tmp_path / "none.mat")
    (tmp_path / "bad.mat").write_text("not a mat")
    with pytest.raises(ValueError, match=r"cannot be read as a \.mat"):
        load_mpii_ground_truth(annotations, tmp_path / "bad.mat")


def _documented_line(start: str) -> str:
    """The one line of README.md and docs/*.md that starts with ``start`` (continuations joined)."""
    from tests.conftest import REPO

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages).replace("\\\n", " ")
    (line,) = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(start)]
    return line


def test_the_documented_mpii_commands_work_as_written(sample, tmp_path, monkeypatch, capsys):
    """DATA_MPII (docs/training.md) and the PCKh command (docs/inference.md), run in a folder laid
    out as docs/data.md says (mpii/annot/valid.json + gt_valid.mat, from the sample)."""
    import shlex

    from pnfs.config import load_config
    from pnfs.preflight import annotation_problems

    annotations, heads_json, mat = sample
    (tmp_path / "mpii" / "annot").mkdir(parents=True)
    (tmp_path / "mpii" / "annot" / "valid.json").write_text(annotations.read_text())
    (tmp_path / "mpii" / "annot" / "gt_valid.mat").write_bytes(mat.read_bytes())
    monkeypatch.chdir(tmp_path)
    data_mpii = shlex.split(_documented_line("DATA_MPII=").split("=", 1)[1])[0].split()
    assert "data.val_head_sizes=mpii/annot/gt_valid.mat" in data_mpii
    cfg = load_config("mpii_mobilenetv2_p3_256", data_mpii)
    assert annotation_problems(cfg) == []
    gt = load_mpii_ground_truth(annotations, heads_json)
    argv = shlex.split(_documented_line("python -m pnfs.evaluate.mpii"), comments=True)[3:]
    predictions = tmp_path / argv[argv.index("--predictions") + 1]
    predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.write_text(json.dumps([{"ann_id": i, "keypoints": gt.joints[i].tolist()} for i in range(3)]))
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["PCKh"] == 100.0
