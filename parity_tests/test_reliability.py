"""The reliability catalogue: interrupted conversions leave nothing behind."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.xdist_group("full-size-timesformer")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_write_leaves_no_output(full_size_timesformer_file, tmp_path, sig):
    out = tmp_path / "work" / "hf"
    cmd = [sys.executable, "-m", "converters.cli", "convert", "timesformer-base-finetuned-k400",
           "--checkpoint", str(full_size_timesformer_file), "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={"CONVERT_PARITY_OFFLINE": "1",
                                                                         "PATH": "/usr/bin:/bin"})
    seen = []
    for line in proc.stderr:  # wait until the writer has started
        seen.append(line)
        if line.startswith("[4/4] writing"):
            time.sleep(0.05)
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert any(line.startswith("[4/4]") for line in seen), "".join(seen) + rest
    if "done in" in rest:
        pytest.skip("the write finished before the signal arrived")
    assert code != 0
    assert not out.exists(), "a partial output directory was left"
    assert list((tmp_path / "work").iterdir()) == [], "temporary files were left beside the output"
