"""python -m heinsen_replication.data <name> [--data_root .data] [--download] [--data_source files|hub]: check (and
optionally download) a dataset, printing its split sizes; python -m heinsen_replication.data heinsen2019 --download:
the 2019 paper's weights."""

import argparse
import os
import sys

from ..errors import UsageError
from .downloads import HEINSEN2019_URL, fetch_heinsen2019_weights
from .splits import DATA_SOURCES, DATASETS, get_dataset_splits


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m heinsen_replication.data',
        description="Check (and optionally download) a dataset: prints split sizes. 'heinsen2019': the 2019 "
                    "paper's published weights, into <data_root>/heinsen2019 (sha256-verified).")
    parser.add_argument('name', choices=DATASETS + ('heinsen2019',))
    parser.add_argument('--data_root', default='.data')
    parser.add_argument('--download', action='store_true')
    parser.add_argument('--data_source', default='files', choices=DATA_SOURCES,
                        help="files (default): the official files under --data_root; hub: sst5, sst2, imdb from "
                             "the Hugging Face hub (the datasets library)")
    parser.add_argument('--base_url', default=HEINSEN2019_URL, help="heinsen2019 only: where to fetch the files from "
                        "(a mirror; file:// URLs work), default the authors' repository at the published commit")
    args = parser.parse_args(argv)
    try:
        if args.name == 'heinsen2019':
            for name, path in fetch_heinsen2019_weights(os.path.join(args.data_root, 'heinsen2019'), args.base_url,
                                                        download=args.download).items():
                print(f"{path}: sha256 verified")
        else:
            splits = get_dataset_splits(args.name, args.data_root, args.download, source=args.data_source)
            for k in ('train', 'valid', 'test'):
                print(f"{k}: {'None' if splits[k] is None else len(splits[k])}")
            print(f"n_classes: {splits['n_classes']}, modality: {splits['modality']}")
    except UsageError as e:                                  # a mistake of the user's: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
