"""`--gpu-device auto`: take a GPU that no other worker on this host holds.

Replicas of one container service (`docker compose up --scale worker=N`) cannot be given
different device ids, and a reservation by count always hands out the same first GPUs. So
each replica sees every GPU and claims one: an exclusive, non-blocking `flock` on
`<lock dir>/gpu-<index>.lock`, held for the life of the process (the kernel releases it when
the process ends, however it ends). The lock directory must be shared by the workers
(compose mounts one volume into every replica).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_DIR_ENV = "WORKER_ORCD_GPU_LOCK_DIR"
DEFAULT_LOCK_DIR = Path("/tmp/worker-orcd-gpu-locks")

_held: list[IO[bytes]] = []  # open lock files: the claims last as long as the process


class NoFreeGpu(RuntimeError):
    """Every visible GPU is held by another worker."""


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)


def visible_gpu_count() -> int:
    """GPUs this process can see (the CUDA driver's count)."""
    import pycuda.driver as drv  # GPU hosts only

    drv.init()
    count: int = drv.Device.count()
    return count


def claim_gpu(count: int | None = None, directory: Path | None = None) -> int:
    """Claim the lowest-numbered free GPU and return its index; NoFreeGpu if none is free."""
    n = visible_gpu_count() if count is None else count
    where = lock_dir() if directory is None else directory
    where.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        f = open(where / f"gpu-{index}.lock", "ab")  # noqa: SIM115 (held open on purpose)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        f.truncate(0)
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        _held.append(f)
        return index
    raise NoFreeGpu(
        f"--gpu-device auto: all {n} GPUs are held by other workers (locks in {where}); "
        "run at most one worker per GPU"
    )
