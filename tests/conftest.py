"""One torch thread pool per core: under pytest-xdist each worker (and the train.py and sample.py it starts) gets its
share of the machine's cores. Left to itself every worker's torch takes all the cores, and two workers on the CI
machine's two cores ran the suite about twice as slowly as one (OpenMP's busy threads contend): measured on
tests/test_every_network.py, test_edm2.py and test_uvit.py, 93 s on one worker, 200 s on two, 66 s on two with a
thread each."""

from __future__ import annotations

import os

import torch


def pytest_configure(config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")  # set in xdist's workers only
    if not workers or "OMP_NUM_THREADS" in os.environ:  # a serial run, or the user chose
        return
    threads = max(1, len(os.sched_getaffinity(0)) // int(workers))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the scripts the tests run as subprocesses
