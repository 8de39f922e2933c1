"""`emo-serve bench gpu-check` imports everywhere and, without CUDA, refuses at once with a clear
message and writes nothing (on a GPU machine it is run by hand, see README)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.cli import main
from server.tools.bench.gpu_check import GpuUnavailable, run_gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_check_refuses_cleanly_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu-check"
    assert main(["bench", "gpu-check", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "nothing was run" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(GpuUnavailable):
        run_gpu_check(out)
