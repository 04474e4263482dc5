"""How the training tests call train.py: in-process, with the tiny SST trees and a tiny backbone."""
import train


def run(argv):
    """train.main on these arguments (paths and numbers as strings) -> what it returns (the test accuracy, or None)."""
    return train.main([str(a) for a in argv])


def sst_args(data_root, backbone, out, *extra, steps_per_epoch=None):
    """train.py's arguments for an SST-5 run on the CPU at batch 8 (steps_per_epoch: --n_iters_per_train_epoch)."""
    steps = [] if steps_per_epoch is None else ['--n_iters_per_train_epoch', steps_per_epoch]
    return ['--dataset_name', 'sst5', '--backbone', backbone, '--data_root', data_root, '--output_dir', out,
            '--batch_sz', 8, '--device', 'cpu', *steps, *extra]


def short_sst_args(data_root, backbone, out, *extra):
    """sst_args of a short run: 2 steps per epoch."""
    return sst_args(data_root, backbone, out, *extra, steps_per_epoch=2)


def one_epoch_args(data_root, backbone, out, *extra, dataset='sst5'):
    """train.py's arguments for one epoch on a text dataset, on the CPU at batch 8."""
    return ['--dataset_name', dataset, '--backbone', backbone, '--data_root', data_root, '--output_dir', out,
            '--batch_sz', 8, '--device', 'cpu', '--n_epochs', 1, *extra]
