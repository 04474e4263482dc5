"""Runs train.main under `accelerate launch` and records which process writes the models, checkpoint and
metrics (one line '<kind> <rank> <pid>' per write, in $WRITES_LOG), for tests/test_training_multiprocess.py."""
import os
import sys

import train                        # the repository root is on PYTHONPATH (tests/test_training_multiprocess.py sets it)
from heinsen_replication import runs


def recorded(kind, fn):
    def wrapper(*args, **kwargs):
        with open(os.environ['WRITES_LOG'], 'a') as f:
            f.write(f"{kind} {os.environ.get('RANK', '0')} {os.getpid()}\n")
        return fn(*args, **kwargs)
    return wrapper


runs.save_model = recorded('model', runs.save_model)
runs.save_checkpoint = recorded('checkpoint', runs.save_checkpoint)
runs.write_metrics = recorded('metrics', runs.write_metrics)

if __name__ == '__main__':
    with open(os.environ['WRITES_LOG'], 'a') as f:
        f.write(f"start {os.environ.get('RANK', '0')} {os.environ.get('WORLD_SIZE', '1')}\n")
    result = train.main(sys.argv[1:])
    print(f"RESULT rank {os.environ.get('RANK', '0')}: {result}")
