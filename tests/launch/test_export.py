"""launch/export.py: ONNX (run with onnxruntime), ExportedProgram and TorchScript files that
match pnfs.inference.predict on person crops of the real COCO sample photos."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pnfs.config import config_to_dict, load_config
from pnfs.evaluate.loading import load_for_inference
from pnfs.inference import person_inputs, predict, predict_scores
from pnfs.keypoints import joint_set
from pnfs.model import build_model
from pnfs.visualize import read_rgb

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pnfs_launch_export", REPO / "launch" / "export.py")
export_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_cli)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The demo model with one part (a smaller graph, quicker to export), randomly initialised."""
    cfg = load_config("demo", ["model.num_parts=1"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "demo.pt"
    torch.save({"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg)}, path)
    return path


@pytest.fixture(scope="module")
def crops(shared_data, checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """Every annotated person of the 4 COCO sample photos, cropped like the loaders: (images, affine)."""
    folder = shared_data / "coco_sample"
    annotations = json.loads((folder / "test_coco.json").read_text())
    cfg = load_for_inference(checkpoint)[1]
    images, affines = [], []
    for image in annotations["images"]:
        boxes = [a["bbox"] for a in annotations["annotations"] if a["image_id"] == image["id"]]
        x, a = person_inputs(
            read_rgb(folder / image["file_name"]), np.array(boxes), tuple(cfg.data.input_size)
        )
        images.append(x)
        affines.append(a)
    return torch.cat(images), torch.cat(affines)


def _expected(checkpoint: Path, images, affine, flip: bool):
    """pnfs.inference.predict with the training model in eval mode, and which joints have a clear
    argmax (top-2 gap > 1e-5: where two pixels tie, either runtime may pick either)."""
    model, cfg = load_for_inference(checkpoint)
    perm = joint_set(cfg.data.dataset).flip_permutation() if flip else None
    pred = predict(model, images, affine, flip_permutation=perm)
    top2 = predict_scores(model, images, perm).flatten(2).topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-5
    assert clear.float().mean() > 0.8
    return pred.keypoints.numpy(), pred.scores.numpy(), clear.numpy()


def _check(keypoints, scores, expected) -> None:
    want_keypoints, want_scores, clear = expected
    assert keypoints.shape == want_keypoints.shape and scores.shape == want_scores.shape
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-4)
    distance = np.abs(keypoints - want_keypoints).max(-1)
    assert distance[clear].max() <= 0.5, f"keypoints off by up to {distance[clear].max():.2f} px"


def _onnx_run(path: Path, images: torch.Tensor, affine: torch.Tensor):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["keypoints", "scores"], {"images": images.numpy(), "affine": affine.numpy()})


def test_onnx_with_decoding_and_flip_test_any_batch(checkpoint, crops, tmp_path, capsys, recwarn):
    out = tmp_path / "pose.onnx"
    argv = ["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out), "--decode", "--flip"]
    assert export_cli.main([*argv, "--batch", "dynamic"]) == 0
    # quiet: stdout holds the command's own line only, and torch's warning that the two inputs share
    # the batch axis (they are meant to) is not shown
    assert capsys.readouterr().out.strip().splitlines() == [
        f"wrote {out} (onnx, inputs ['images', 'affine'] of batch dynamic, 128x96, decode=True)"
    ]
    assert not [w for w in recwarn if "axis name" in str(w.message)]
    images, affine = crops
    for n in (len(images), 3):  # the batch is free
        _check(
            *_onnx_run(out, images[:n], affine[:n]), _expected(checkpoint, images[:n], affine[:n], flip=True)
        )


def test_onnx_with_decoding_at_a_fixed_batch(checkpoint, crops, tmp_path):
    out = tmp_path / "pose4.onnx"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--format",
        "onnx",
        "--out",
        str(out),
        "--decode",
        "--batch",
        "4",
    ]
    assert export_cli.main(argv) == 0
    images, affine = crops[0][:4], crops[1][:4]
    _check(*_onnx_run(out, images, affine), _expected(checkpoint, images, affine, flip=False))
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        _onnx_run(out, crops[0][:5], crops[1][:5])


def test_torchscript_with_decoding(checkpoint, crops, tmp_path):
    out = tmp_path / "pose.ts"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--format",
        "torchscript",
        "--out",
        str(out),
        "--decode",
        "--flip",
    ]
    assert export_cli.main(argv) == 0
    images, affine = crops
    keypoints, scores = torch.jit.load(str(out))(images, affine)
    _check(keypoints.numpy(), scores.numpy(), _expected(checkpoint, images, affine, flip=True))


def test_exported_program_of_the_score_maps(checkpoint, crops, tmp_path):
    out = tmp_path / "pose.pt2"
    assert (
        export_cli.main(["--checkpoint", str(checkpoint), "--format", "exported-program", "--out", str(out)])
        == 0
    )
    model = load_for_inference(checkpoint)[0]
    images = crops[0][:5]
    with torch.no_grad():
        got = torch.export.load(str(out)).module()(images)
        torch.testing.assert_close(got, model(images), rtol=0, atol=1e-4)


def test_flip_without_decode_is_refused(checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--flip"]
    assert export_cli.main(argv) == 2
    assert "--flip needs --decode" in capsys.readouterr().err


def test_pruned_export_reports_the_score_change(checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned.ts"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--format",
        "torchscript",
        "--out",
        str(out),
        "--prune-below",
        "0.3",
    ]
    assert export_cli.main(argv) == 0
    printed = capsys.readouterr().out
    # the untrained model's alpha is uniform (1/4 per op, zero included): each edge keeps one op
    assert "pruned below 0.3:" in printed and "score change on random inputs: max" in printed
    kept, total = (int(v) for v in printed.split("pruned below 0.3: ")[1].split(" ops kept")[0].split(" of "))
    assert kept < total


class _Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_onnx_export_without_onnxscript_names_the_missing_package(tmp_path, monkeypatch):
    from pnfs.deploy import export_file

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(
        RuntimeError, match=r"needs the onnx and onnxscript packages \(onnxscript is missing\)"
    ):
        export_file(_Double(), (torch.ones(1, 3),), ["x"], "onnx", tmp_path / "d.onnx", dynamic=False)


def test_an_exported_file_the_onnx_checker_rejects_is_an_error_naming_it(tmp_path, monkeypatch):
    import onnx

    from pnfs.deploy import export_file

    def reject(path, full_check=False):
        assert full_check, "the shapes must be inferred too"
        raise onnx.checker.ValidationError("bad node")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    out = tmp_path / "d.onnx"
    with pytest.raises(ValueError, match=rf"exported '{out}' is not a valid ONNX model: bad node"):
        export_file(_Double(), (torch.ones(1, 3),), ["x"], "onnx", out, dynamic=False)


def test_predict_and_the_onnx_export_agree_by_default(checkpoint, shared_data, tmp_path):
    """launch/predict.py with the default eval.amp and the ONNX export of the same checkpoint give
    the same joints on a CPU (a bfloat16 default moved a joint 75.8 px from the export)."""
    spec = importlib.util.spec_from_file_location("pnfs_launch_predict", REPO / "launch" / "predict.py")
    predict_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict_cli)
    photo = shared_data / "coco_sample" / "000000000785.jpg"
    boxes = [[280.0, 40.0, 220.0, 380.0], [20.0, 60.0, 150.0, 300.0]]
    out = tmp_path / "pred"
    argv = ["--checkpoint", str(checkpoint), "--image", str(photo), "--out", str(out)]
    assert predict_cli.main([*argv, *(a for b in boxes for a in ("--box", ",".join(map(str, b))))]) == 0
    people = json.loads((out / "000000000785_pose.json").read_text())["people"]
    predicted = np.asarray([p["keypoints"] for p in people])

    onnx_file = tmp_path / "pose.onnx"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--format",
        "onnx",
        "--out",
        str(onnx_file),
        "--decode",
        "--flip",
    ]
    assert export_cli.main(argv) == 0
    cfg = load_for_inference(checkpoint)[1]
    images, affine = person_inputs(
        read_rgb(photo), np.asarray(boxes), tuple(cfg.data.input_size), cfg.data.margin
    )
    keypoints, scores = _onnx_run(onnx_file, images, affine)
    _, _, clear = _expected(checkpoint, images, affine, flip=True)
    distance = np.abs(predicted[..., :2] - keypoints).max(-1)
    assert distance[clear].max() <= 0.5, f"predict is {distance[clear].max():.1f} px from the export"
    np.testing.assert_allclose(predicted[..., 2], scores, atol=2e-3)  # the JSON rounds to 3 digits


# ``launch/export.py --decode --flip eval.flip_shift=true`` (and ``eval.refine=gaussian``): the
# ONNX model, run with onnxruntime, decodes the joints that :func:`pnfs.inference.predict` finds
# with the same flip shift and refinement (issue 26: an export that dropped ``flip_shift`` or
# ``refine`` would disagree with ``predict``; the default export tests cannot see it).


@pytest.mark.parametrize("refine", ["quarter", "gaussian"])
def test_onnx_export_with_flip_shift_decodes_like_predict(checkpoint, crops, tmp_path, refine):
    out = tmp_path / f"shift-{refine}.onnx"
    argv = ["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out), "--decode", "--flip"]
    assert export_cli.main([*argv, "eval.flip_shift=true", f"eval.refine={refine}"]) == 0
    images, affine = crops
    keypoints, scores = _onnx_run(out, images, affine)

    model, cfg = load_for_inference(checkpoint)
    perm = joint_set(cfg.data.dataset).flip_permutation()
    shifted = predict(model, images, affine, flip_permutation=perm, flip_shift=True, refine=refine)
    unshifted = predict(model, images, affine, flip_permutation=perm, flip_shift=False, refine=refine)
    other = predict(
        model,
        images,
        affine,
        flip_permutation=perm,
        flip_shift=True,
        refine="quarter" if refine == "gaussian" else "gaussian",
    )
    top2 = predict_scores(model, images, perm, flip_shift=True).flatten(2).topk(2, dim=-1).values
    clear = ((top2[..., 0] - top2[..., 1]) > 1e-5).numpy()
    assert clear.mean() > 0.8
    want = shifted.keypoints.numpy()
    # the test can fail: the shift and the refinement each move joints by more than the tolerance
    for name, alternative in (("flip_shift=false", unshifted), ("the other refinement", other)):
        apart = np.abs(alternative.keypoints.numpy() - want).max(-1) > 1.0
        assert (clear & apart).sum() >= 5, f"{name} gives the same joints here: the test would prove nothing"

    distance = np.abs(keypoints - want).max(-1)
    assert distance[clear].max() <= 0.5, f"export is off predict by {distance[clear].max():.2f} px"
    np.testing.assert_allclose(scores, shifted.scores.numpy(), rtol=0, atol=1e-4)
