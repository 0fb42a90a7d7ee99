"""`--gpu-device auto` between processes: each worker claims the lowest GPU no other one
holds, a worker finding all taken fails with a message, and a claim ends with its process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

CLAIM = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from worker.gpu_select import NoFreeGpu, claim_gpu\n"
    "try:\n"
    "    print(claim_gpu(count=2, directory=Path(sys.argv[1])), flush=True)\n"
    "except NoFreeGpu as exc:\n"
    "    print(f'none: {exc}', flush=True)\n"
    "    sys.exit(3)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


def claimant(locks: Path, hold_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(locks), str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
    )


def first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def test_workers_claim_distinct_gpus_and_release_them_on_exit(tmp_path: Path) -> None:
    a = claimant(tmp_path, 60)
    assert first_line(a) == "0"
    b = claimant(tmp_path, 60)
    assert first_line(b) == "1"
    c = claimant(tmp_path, 0)
    line = first_line(c)
    assert c.wait(30) == 3
    assert line.startswith("none:") and "all 2 GPUs are held" in line
    a.kill()  # however a worker ends, its GPU is free again
    a.wait(30)
    time.sleep(0.1)
    d = claimant(tmp_path, 0)
    assert first_line(d) == "0"
    assert d.wait(30) == 0
    b.kill()
    b.wait(30)
