"""One validation layer: every problem of a config, with its line and a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgesmith.commands._common import make_config
from edgesmith.compress.distill import DistillConfig
from edgesmith.errors import EdgesmithError

pytestmark = pytest.mark.timeout(60)  # no model, no data: seconds at most


def test_a_device_profile_file_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    from edgesmith.runtime.profiles import load_profile

    data = load_profile("rpi5").model_dump()
    data.update(arch="riscv64", threads=0, thread=2)
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    lines = path.read_text().splitlines()
    line = {k: next(i + 1 for i, t in enumerate(lines) if t.startswith(f"{k}:")) for k in data}
    with pytest.raises(EdgesmithError) as e:
        load_profile(str(path))
    msg = e.value.message
    assert msg.startswith(f"malformed device profile {path}: 3 problems: ")
    assert f"line {line['arch']}: 'arch': Input should be" in msg and "(got 'riscv64')" in msg
    assert f"line {line['threads']}: 'threads': Input should be greater than or equal to 1" in msg
    assert f"line {line['thread']}: unknown key 'thread'" in msg
    assert f"line {line['thread']}: did you mean 'threads'?" in (e.value.hint or "")


def test_command_options_report_every_problem_by_flag() -> None:
    with pytest.raises(EdgesmithError) as e:
        make_config(DistillConfig, {"optimizer": "lion"}, {"alpha": 2.0, "epochs": 0})
    msg = e.value.message
    assert msg.startswith("3 problems: ")
    assert "--alpha: Input should be less than or equal to 1 (got 2.0)" in msg
    assert "--epochs: Input should be greater than 0 (got 0)" in msg
    assert "--optimizer: Input should be 'adamw', 'adam' or 'sgd' (got 'lion')" in msg
    assert e.value.hint == "see --help for the accepted values"
