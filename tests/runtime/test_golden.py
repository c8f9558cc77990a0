"""Golden samples and tolerances (edgesmith.runtime.golden): top-1 checks that kernels within tolerance keep."""

from __future__ import annotations

import numpy as np

from edgesmith.runtime.golden import golden_tolerance, pick_golden


def test_tolerance_per_precision_scales_with_the_outputs() -> None:
    out = np.array([[4.0, -2.0], [1.0, 0.5]], np.float32)
    fp32, int8 = golden_tolerance("fp32", out), golden_tolerance("int8", out)
    assert fp32 == {"atol": 1e-4 + 4e-4, "rtol": 1e-3, "top1": True}
    assert int8 == {"atol": 0.05 * 4.0 + 1e-3, "rtol": 0.05, "top1": True}


def test_golden_samples_have_a_clear_top1_lead() -> None:
    # leads: 0.05, 3.0, 0.2, 2.5, 1.0 -> with atol 0.4 only leads above 0.8 are kept
    out = np.array(
        [[1.0, 0.95, 0], [3.0, 0, 0], [0, 0.2, 0.4], [0, 2.5, 0], [1.0, 0, 0]], np.float32
    )
    assert pick_golden(out, atol=0.4, n=3).tolist() == [1, 3, 4]
    # fewer clear samples than asked: the largest leads fill up, in their original order
    assert pick_golden(out, atol=0.4, n=4).tolist() == [1, 2, 3, 4]
    # one value per sample (regression): the first n
    assert pick_golden(np.arange(10, dtype=np.float32)[:, None], atol=0.1, n=3).tolist() == [
        0,
        1,
        2,
    ]
