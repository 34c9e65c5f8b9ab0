"""MPII PCKh: hand-computed cases, Table IV layout, the 0.11 HRNet habit, the real sample."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pnfs.evaluate.mpii import (
    PCKhReport,
    head_size_from_box,
    head_sizes_from_gt_mat,
    load_mpii_ground_truth,
    main,
    pckh,
    predictions_array,
    table_iv,
)
from pnfs.keypoints import MPII, MPII_FROM_RAW

J = {name: i for i, name in enumerate(MPII.joints)}


def _offset(n, errors, head=10.0):
    """gt at 0, pred moved by ``errors`` [N, 16] head-size units along (3/5, 4/5)."""
    gt = np.zeros((n, 16, 2))
    pred = gt + np.asarray(errors, dtype=np.float64)[..., None] * head * np.array([0.6, 0.8])
    return pred, gt


def test_an_error_exactly_at_the_threshold_counts():
    gt = np.zeros((1, 16, 2))
    pred = gt.copy()
    pred[0, :, :] = [3.0, 4.0]  # error 5 px = 0.5 x head size 10, exactly
    per_joint, mean = pckh(pred, gt, np.ones((1, 16)), np.array([10.0]), 0.5)
    assert np.all(per_joint == 100.0) and mean == 100.0
    pred[0, :, 0] = 3.0 + 1e-9
    per_joint, mean = pckh(pred, gt, np.ones((1, 16)), np.array([10.0]), 0.5)
    assert np.all(per_joint == 0.0) and mean == 0.0


def test_invisible_joints_are_not_scored():
    errors = np.full((2, 16), 0.2)
    errors[0, J["left_wrist"]] = 5.0  # far off but not annotated
    visible = np.ones((2, 16))
    visible[0, J["left_wrist"]] = 0
    visible[:, J["right_ankle"]] = 0  # no annotation at all for this joint
    per_joint, mean = pckh(*_offset(2, errors), visible, np.full(2, 10.0), 0.5)
    assert per_joint[J["left_wrist"]] == 100.0
    assert np.isnan(per_joint[J["right_ankle"]])
    assert mean == 100.0


def test_pelvis_and_thorax_are_reported_but_left_out_of_the_mean():
    errors = np.full((1, 16), 0.1)
    errors[0, J["pelvis"]] = errors[0, J["thorax"]] = 1.0
    per_joint, mean = pckh(*_offset(1, errors), np.ones((1, 16)), np.array([10.0]), 0.5)
    assert per_joint[J["pelvis"]] == 0.0 and per_joint[J["thorax"]] == 0.0
    assert mean == 100.0


def test_mean_is_weighted_by_visible_counts():
    # 3 people; head_top visible 3x (all correct), upper_neck visible once (wrong), the rest invisible
    errors = np.zeros((3, 16))
    errors[:, J["upper_neck"]] = 0.9
    visible = np.zeros((3, 16))
    visible[:, J["head_top"]] = 1
    visible[0, J["upper_neck"]] = 1
    per_joint, mean = pckh(*_offset(3, errors), visible, np.full(3, 10.0), 0.5)
    assert per_joint[J["head_top"]] == 100.0 and per_joint[J["upper_neck"]] == 0.0
    assert mean == pytest.approx(75.0)  # 3 of 4, not the 50 of an unweighted mean


@pytest.mark.parametrize(
    ("error", "at_05", "at_01", "at_011"),
    [(0.05, 100, 100, 100), (0.105, 100, 0, 100), (0.109, 100, 0, 100), (0.3, 100, 0, 0), (0.6, 0, 0, 0)],
)
def test_thresholds_05_01_and_hrnets_011(error, at_05, at_01, at_011):
    pred, gt = _offset(1, np.full((1, 16), error))
    visible, head = np.ones((1, 16)), np.array([10.0])
    assert pckh(pred, gt, visible, head, 0.5)[1] == at_05
    assert pckh(pred, gt, visible, head, 0.1)[1] == at_01
    assert pckh(pred, gt, visible, head, 0.11)[1] == at_011
    report = table_iv(pred, gt, visible, head)
    compat = table_iv(pred, gt, visible, head, hrnet_compat=True)
    assert report.columns["Mean@0.1"] == at_01 and compat.columns["Mean@0.1"] == at_011
    assert report.low_threshold == 0.1 and compat.low_threshold == 0.11


def test_table_iv_columns_average_left_and_right():
    errors = np.zeros((2, 16))
    errors[0, J["left_shoulder"]] = 1.0  # 1 of 2 left shoulders wrong: left 50, right 100
    errors[:, J["head_top"]] = [0.0, 1.0]
    report = table_iv(*_offset(2, errors), np.ones((2, 16)), np.full(2, 10.0))
    assert report.columns["Shoulder"] == 75.0
    assert report.columns["Head"] == 50.0
    assert report.columns["Elbow"] == 100.0
    assert report.columns["Mean"] == pytest.approx(100 * (28 - 2) / 28)
    lines = report.table().splitlines()
    assert lines[1].split(" | ")[0].strip() == "Head" and "Mean@0.1" in lines[1]
    metrics = report.metrics()
    assert metrics["PCKh"] == report.columns["Mean"] and metrics["PCKh/left_shoulder"] == 50.0


def test_head_size_is_06_of_the_head_box_diagonal():
    np.testing.assert_allclose(head_size_from_box(np.array([[10, 20, 40, 60]])), [0.6 * 50])


def test_head_sizes_are_one_per_box():
    np.testing.assert_allclose(head_size_from_box([[0, 0, 3, 4], [1, 1, 7, 9]]), [0.6 * 5, 0.6 * 10])


def test_gt_mat_errors_name_the_file_and_the_shape(tmp_path):
    import scipy.io

    bad = tmp_path / "bad.mat"
    bad.write_text("not a mat")
    with pytest.raises(
        ValueError, match=re.escape(f"data.val_head_sizes: '{bad}' cannot be read as a .mat file")
    ):
        head_sizes_from_gt_mat(bad)
    none = tmp_path / "none.mat"
    scipy.io.savemat(str(none), {"jnt_missing": np.zeros((16, 3))})
    with pytest.raises(ValueError, match=re.escape(f"data.val_head_sizes: '{none}' has no 'headboxes_src'")):
        head_sizes_from_gt_mat(none)
    for shape in [(2, 3, 4), (2, 2)]:
        odd = tmp_path / f"odd{len(shape)}.mat"
        scipy.io.savemat(str(odd), {"headboxes_src": np.ones(shape)})
        want = f"data.val_head_sizes: '{odd}': headboxes_src must be [2, 2, N], got {list(shape)}"
        with pytest.raises(ValueError, match=re.escape(want)):
            head_sizes_from_gt_mat(odd)
    boxes = np.zeros((2, 2, 2), dtype=np.int32)  # integer boxes in the file: sizes still exact
    boxes[1] = [[3, 6], [4, 8]]
    scipy.io.savemat(str(tmp_path / "int.mat"), {"headboxes_src": boxes})
    np.testing.assert_allclose(head_sizes_from_gt_mat(tmp_path / "int.mat", 2), [3.0, 6.0])


def _report(low: float) -> PCKhReport:
    columns = {"Head": 1.0, "Shoulder": 2.0, "Elbow": 3.0, "Wrist": 4.0, "Hip": 5.0, "Knee": 6.0}
    columns.update({"Ankle": 7.0, "Mean": 8.0, "Mean@0.1": 9.125})
    return PCKhReport(per_joint=np.zeros(16), columns=columns, threshold=0.5, low_threshold=low)


def test_table_text_in_table_iv_layout():
    head = " | ".join(
        f"{n:>8}" for n in ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean"]
    )
    assert _report(0.1).table().splitlines() == [
        "PCKh@0.5",
        head + " | Mean@0.1",
        " | ".join(f"{v:>8.2f}" for v in [1, 2, 3, 4, 5, 6, 7, 8, 9.125]),
    ]
    compat = _report(0.11).table().splitlines()
    assert compat[1] == head + " | Mean@0.1 (at 0.11, HRNet-compat)"
    assert compat[2].endswith(f" | {9.125:>32.2f}")  # the value as wide as its column name


def test_command_line_arguments(shared_data, tmp_path, capsys):
    root = shared_data / "mpii_sample"
    gt = load_mpii_ground_truth(root / "test_mpii.json", root / "mpii_headsizes_pose-hg-train_valid_h5.json")
    preds = tmp_path / "pred.json"  # every joint 0.3 head sizes off
    off = gt.joints + (0.3 * gt.head_size[:, None])[..., None] * np.array([0.6, 0.8])
    preds.write_text(json.dumps([{"ann_id": i, "keypoints": off[i].tolist()} for i in range(3)]))
    args = ["--annotations", str(root / "test_mpii.json"), "--predictions", str(preds)]
    args += ["--head-sizes", str(root / "mpii_headsizes_pose-hg-train_valid_h5.json")]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == "PCKh@0.5"
    assert main([*args, "--threshold", "0.25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["PCKh"] == 0.0
    for missing in ("--annotations", "--predictions"):
        i = args.index(missing)
        with pytest.raises(SystemExit) as stop:
            main(args[:i] + args[i + 2 :])
        assert stop.value.code == 2 and missing in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m pnfs.evaluate.mpii ")
    assert "PCKh" in usage.split("\n\n")[1]  # the module's first docstring line


def test_bad_shapes_and_head_sizes_are_refused():
    with pytest.raises(ValueError, match=r"\[N, 16, 2\]"):
        pckh(np.zeros((1, 17, 2)), np.zeros((1, 17, 2)), np.ones((1, 17)), np.ones(1), 0.5)
    with pytest.raises(ValueError, match="head sizes"):
        pckh(np.zeros((1, 16, 2)), np.zeros((1, 16, 2)), np.ones((1, 16)), np.zeros(1), 0.5)


def test_real_sample_ground_truth_is_read_in_our_joint_order(shared_data):
    root = shared_data / "mpii_sample"
    gt = load_mpii_ground_truth(root / "test_mpii.json", root / "mpii_headsizes_pose-hg-train_valid_h5.json")
    raw = json.loads((root / "test_mpii.json").read_text())
    np.testing.assert_allclose(gt.head_size, [117.96, 78.48, 81.22], atol=0.005)
    assert int(gt.visible.sum()) == 44
    for i, person in enumerate(raw):
        joints = np.asarray(person["joints"])
        np.testing.assert_allclose(gt.joints[i, J["head_top"]], joints[9] - 1)  # raw 9 = head top, 1-based
        np.testing.assert_allclose(gt.joints[i, J["left_wrist"]], joints[15] - 1)
        np.testing.assert_array_equal(gt.visible[i], np.asarray(person["joints_vis"])[list(MPII_FROM_RAW)])


def test_real_sample_pckh(shared_data):
    root = shared_data / "mpii_sample"
    heads = json.loads((root / "mpii_headsizes_pose-hg-train_valid_h5.json").read_text())
    gt = load_mpii_ground_truth(root / "test_mpii.json", root / "mpii_headsizes_pose-hg-train_valid_h5.json")
    # valid.h5 parts (same 1-based convention) differ from the json joints by <= 1 px
    h5 = np.stack([np.asarray(h["h5_part"])[list(MPII_FROM_RAW)] - 1 for h in heads])
    report = table_iv(h5, gt.joints, gt.visible, gt.head_size)
    assert report.columns["Mean"] == 100.0 and report.columns["Mean@0.1"] == 100.0
    # joint j of person p moved by (0.05 + 0.1 (p + j) mod 7) head sizes: hand-countable hits
    p, j = np.meshgrid(np.arange(3), np.arange(16), indexing="ij")
    frac = 0.05 + 0.1 * ((p + j) % 7)  # 0.05, 0.15, ..., 0.65
    pred = gt.joints + (frac * gt.head_size[:, None])[..., None] * np.array([0.6, 0.8])
    in_mean = np.array([n not in ("pelvis", "thorax") for n in MPII.joints])
    vis = gt.visible > 0
    for threshold in (0.5, 0.1, 0.11):
        want = 100 * ((frac <= threshold) & vis)[:, in_mean].sum() / vis[:, in_mean].sum()
        assert pckh(pred, gt.joints, gt.visible, gt.head_size, threshold)[1] == pytest.approx(want)
    # the same through the command line, from a predictions file
    assert predictions_array([{"ann_id": i, "keypoints": pred[i].tolist()} for i in range(3)], 3).shape == (
        3,
        16,
        2,
    )


def test_command_line(shared_data, tmp_path, capsys):
    root = shared_data / "mpii_sample"
    gt = load_mpii_ground_truth(root / "test_mpii.json", root / "mpii_headsizes_pose-hg-train_valid_h5.json")
    preds = tmp_path / "pred.json"
    preds.write_text(json.dumps([{"ann_id": i, "keypoints": gt.joints[i].tolist()} for i in range(3)]))
    args = ["--annotations", str(root / "test_mpii.json"), "--predictions", str(preds)]
    head_args = ["--head-sizes", str(root / "mpii_headsizes_pose-hg-train_valid_h5.json")]
    assert main([*args, *head_args, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["PCKh"] == 100.0 and metrics["PCKh@0.1"] == 100.0
    assert main([*args, *head_args, "--hrnet-compat"]) == 0
    assert "0.11" in capsys.readouterr().out
    assert main(args) == 2  # no head boxes in this json and no head-size file
    assert "head" in capsys.readouterr().err
    preds.write_text(json.dumps([{"ann_id": 0, "keypoints": gt.joints[0].tolist()}]))
    assert main([*args, *head_args]) == 2
    assert "no prediction for persons [1, 2]" in capsys.readouterr().err
