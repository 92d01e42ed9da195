"""One intra-op thread for a block of test code: CPU timings and float sums stay the same run to run."""

import contextlib

import torch


@contextlib.contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
