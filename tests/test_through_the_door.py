"""Options set the way a user sets them (issue 26): a config override on a launch script's
command line, then the effect on what the product writes."""

from __future__ import annotations

import numpy as np
from test_export import _onnx_run, checkpoint, crops, export_cli  # noqa: F401  (module fixtures)

from pnfs.evaluate.loading import load_for_inference
from pnfs.inference import predict, predict_scores


def test_export_decodes_with_eval_refine_gaussian_like_predict(checkpoint, crops, tmp_path):  # noqa: F811
    """``launch/export.py --decode eval.refine=gaussian``: onnxruntime gives what ``predict`` gives
    with the Gaussian refinement, not the quarter offset."""
    out = tmp_path / "gaussian.onnx"
    argv = ["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out), "--decode"]
    assert export_cli.main([*argv, "eval.refine=gaussian"]) == 0
    images, affine = crops
    keypoints, _ = _onnx_run(out, images, affine)

    model, _ = load_for_inference(checkpoint)
    gaussian = predict(model, images, affine, refine="gaussian").keypoints.numpy()
    quarter = predict(model, images, affine, refine="quarter").keypoints.numpy()
    top2 = predict_scores(model, images).flatten(2).topk(2, dim=-1).values
    clear = ((top2[..., 0] - top2[..., 1]) > 1e-5).numpy()
    apart = np.abs(gaussian - quarter).max(-1) > 1.0  # joints where the two decodings disagree
    assert (clear & apart).sum() >= 10, "the two refinements agree here: the test would prove nothing"
    distance = np.abs(keypoints - gaussian).max(-1)
    assert distance[clear].max() <= 0.5, (
        f"export is off the Gaussian decoding by {distance[clear].max():.2f} px"
    )
