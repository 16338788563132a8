#!/usr/bin/env python3
"""Fetch Multi30k task 1 raw text (train, val, test_2016_flickr; en, de, fr, cs) into a folder.

Takes a local mirror first: $NMTKIT_DATA_MIRROR/multi30k, else ../shared/data/multi30k beside the
checkout; otherwise downloads from the public repository (multi30k/dataset, data/task1/raw).
Files stay gzipped: `nmtkit preprocess` reads PREFIX.LANG.gz directly.

    python data/multi30k.py runs/data/multi30k      # -> runs/data/multi30k/{train,val,test_2016_flickr}.{en,de}.gz
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import urllib.request
from pathlib import Path

URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{name}"
SPLITS = ("train", "val", "test_2016_flickr")


def mirrors() -> list[Path]:
    here = Path(__file__).resolve().parent.parent
    found = [Path(os.environ["NMTKIT_DATA_MIRROR"]) / "multi30k"] if os.environ.get("NMTKIT_DATA_MIRROR") else []
    return found + [here.parent / "shared" / "data" / "multi30k"]


def fetch(out: Path, langs: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for lang in langs:
            name = f"{split}.{lang}.gz"
            target = out / name
            if target.exists():
                continue
            local = next((m / name for m in mirrors() if (m / name).is_file()), None)
            if local is not None:
                shutil.copyfile(local, target)
                print(f"copied {local} -> {target}", file=sys.stderr)
            else:
                print(f"downloading {URL.format(name=name)}", file=sys.stderr)
                partial = target.with_name(target.name + ".part")
                try:
                    with urllib.request.urlopen(URL.format(name=name), timeout=60) as r, open(partial, "wb") as f:
                        shutil.copyfileobj(r, f)
                except OSError as e:  # URLError, timeouts, disk errors
                    partial.unlink(missing_ok=True)
                    sys.exit(f"data/multi30k.py: cannot download {name} ({e}); no local mirror found in "
                             f"{', '.join(map(str, mirrors()))} (set NMTKIT_DATA_MIRROR to a folder holding multi30k/)")
                partial.replace(target)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--langs", default="en,de", help="comma-separated languages [en,de]")
    args = parser.parse_args()
    fetch(args.out, tuple(args.langs.split(",")))
