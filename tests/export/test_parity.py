from __future__ import annotations

import numpy as np

from edgesmith.export.parity import compare_outputs


def test_parity_reports_agreement_diff_and_reasons() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    cand = ref.copy()
    cand[1] = [1.0, 0.5]  # one of four flips its top-1
    p = compare_outputs(ref, cand, top1_agreement=0.9, max_abs_diff=0.1)
    assert p.top1_agreement == 0.75 and p.max_abs_diff == 1.0 and not p.passed
    assert "top-1 agreement 0.7500 < 0.9" in p.reason and "max abs diff 1 > 0.1" in p.reason
    assert compare_outputs(ref, ref, 1.0, 0.0 + 1e-12).passed
    bad = compare_outputs(ref, ref[:, :1], 0.5, None)
    assert not bad.passed and "shapes differ" in bad.reason
