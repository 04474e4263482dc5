"""
The process-global settings of a run, set in one place and restored after it: torch's float32 matmul precision, its
CPU threads and the seeds of every random number generator (Python's, NumPy's, torch's). A run started by a
function call (train.main in a test, train.build_run in a benchmark) leaves the process as it found it.
"""
import contextlib
import random

import numpy as np
import torch
from accelerate.utils import set_seed


@contextlib.contextmanager
def run_settings(args, seed=True):
    """with run_settings(args): the run's settings (args.matmul_precision; args.threads, None = torch's own choice;
    with seed, every generator seeded with args.rng_seed), and the caller's restored on leaving, also on an error."""
    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        torch.set_float32_matmul_precision(args.matmul_precision)
        if getattr(args, 'threads', None):
            torch.set_num_threads(args.threads)
        if seed:
            set_seed(args.rng_seed)
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
