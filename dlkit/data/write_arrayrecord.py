"""`python -m dlkit.data.write_arrayrecord DATASET OUT_DIR`: a registered dataset's splits
written once to ArrayRecord files, to train from with `data.name=arrayrecord`.

    python -m dlkit.data.write_arrayrecord fashion_mnist /data/fmnist_ar --num-files 4

It sits above the dataset registry (which reads ArrayRecord files through
:mod:`dlkit.data.arrayrecord`), so the reader and the registry import each other in one
direction only.
"""

import argparse

from dlkit.data import arrayrecord, datasets


def main(argv=None) -> None:
    """`python -m dlkit.data.write_arrayrecord DATASET OUT_DIR`: writes a registered dataset's train
    and test splits (as `load_dataset` reads them) to ArrayRecord files."""
    parser = argparse.ArgumentParser(prog="python -m dlkit.data.write_arrayrecord")
    parser.add_argument("dataset", help=f"one of {datasets.available_datasets()}")
    parser.add_argument("out_dir")
    parser.add_argument("--num-files", type=int, default=1, help="files per split")
    parser.add_argument("--data-dir", default=None, help="the dataset's data.data_dir")
    parser.add_argument("--path", default=None, help="the dataset's data.path")
    parser.add_argument("--splits", default="train,test")
    args = parser.parse_args(argv)
    options = {"data_dir": args.data_dir, "path": args.path}
    for split in args.splits.split(","):
        source = datasets.load_dataset(
            args.dataset, split, **{k: v for k, v in options.items() if v}
        )
        paths = arrayrecord.write_split(args.out_dir, split, source, num_files=args.num_files)
        print(f"{split}: {len(source)} examples -> {len(paths)} file(s) in {args.out_dir}")


if __name__ == "__main__":
    main()
