#!/usr/bin/env python3
"""The image store's numbers (issue 4): storing a 10,000-file layer, reusing it, deep images.

Usage (as root, after ``.ci/setup``)::

    .venv/bin/python bench/store.py                 # 10,000 files, 30 reuse rounds, 50 start rounds
    .venv/bin/python bench/store.py --files 10000 --rounds 50 --starts 100

Everything happens in a fresh temporary data root (removed at the end).  Reported:

- ``first store``: ``Store.add_layer_dir`` of a directory of ``--files`` files (100 per
  subdirectory, 0-4 KiB each) into an empty store: the copy, the layer digest (the deterministic
  tar's sha256, layertar.digest_dir) and the rename;
- ``unchanged reuse``: the same call again, the directory unchanged: a cache hit keyed on a stat
  snapshot (lstat of every entry; no file is opened).  ``bytes read`` is the process's ``rchar``
  from /proc/self/io over the call: the cache entry and the layer's meta.json, not the files;
  ``stat snapshot alone`` is the part of it that walks the tree;
- ``tag, unchanged``: ``Image.from_layers(dir).tag("bench:1")`` again -- what a test pays;
- ``load by reference``: ``Image.load("bench:1")``: reuse through the store, no directory walked;
- ``start 1 layer`` vs ``start 5 layers``: ``sandbox.run(["true"])`` on a busybox image split
  into 5 stored layers vs the same files as one stored layer, interleaved round by round.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_sandbox import Image, Sandbox
from pytest_sandbox.images.store import Store, stat_snapshot


def make_tree(root: Path, files: int) -> int:
    rng = random.Random(4)
    total = 0
    for i in range(files):
        d = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        data = rng.randbytes(rng.randrange(0, 4096))
        (d / f"f{i:05d}").write_bytes(data)
        total += len(data)
    return total


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def summary(samples: list[float]) -> str:
    qs = statistics.quantiles(samples, n=10) if len(samples) > 1 else [samples[0]] * 9
    return (
        f"median {statistics.median(samples):8.2f} ms   p10 {qs[0]:8.2f}   p90 {qs[-1]:8.2f}   "
        f"min {min(samples):8.2f}   (n={len(samples)})"
    )


def busybox_layers(root: Path, parts: int) -> list[Path]:
    """The busybox binary and its applet links spread over ``parts`` directories."""
    busybox = shutil.which("busybox")
    if busybox is None:
        sys.exit("busybox-static is needed: apt-get install busybox-static")
    applets = sorted(os.popen(f"{busybox} --list").read().split())
    dirs = [root / f"part{i}" for i in range(parts)]
    for d in dirs:
        (d / "bin").mkdir(parents=True)
    shutil.copy2(busybox, dirs[0] / "bin" / "busybox")
    for i, applet in enumerate(a for a in applets if a != "busybox"):
        (dirs[i % parts] / "bin" / applet).symlink_to("busybox")
    for name in ("proc", "dev", "sys", "tmp", "etc"):
        (dirs[-1] / name).mkdir()
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=30, help="unchanged-reuse rounds")
    parser.add_argument("--starts", type=int, default=50, help="container starts per image")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (containers, and a store that keeps file owners)")

    with tempfile.TemporaryDirectory(prefix="psbx-bench-store-") as tmp:
        base = Path(tmp)
        tree = base / "tree"
        size = make_tree(tree, args.files)
        print(
            f"layer directory: {args.files} files in {args.files // 100} directories, {size / 2**20:.1f} MiB"
        )
        store = Store(base / "data" / "store")

        first = timed(lambda: store.add_layer_dir(tree))
        print(f"first store          {first:10.1f} ms   (copy + digest + rename)")

        reuse, snaps, reads = [], [], []
        for _ in range(args.rounds):
            before = rchar()
            reuse.append(timed(lambda: store.add_layer_dir(tree)))
            reads.append(rchar() - before)
            snaps.append(timed(lambda: stat_snapshot(str(tree))))
        print(f"unchanged reuse      {summary(reuse)}")
        print(f"  stat snapshot alone {summary(snaps)}")
        print(f"  bytes read per reuse: max {max(reads)} (the layer holds {size} bytes of file data)")

        Image.from_layers(tree, base=None, store=store).tag("bench:1")
        tags = [
            timed(lambda: Image.from_layers(tree, base=None, store=store).tag("bench:1")) for _ in range(10)
        ]
        print(f"tag, unchanged       {summary(tags)}")
        loads = [timed(lambda: Image.load("bench:1", store=store)) for _ in range(50)]
        print(f"load by reference    {summary(loads)}")

        five = busybox_layers(base / "five", 5)
        one = busybox_layers(base / "one", 1)
        image5 = Image.from_layers(*five, base=None, store=store).tag("five:1")
        image1 = Image.from_layers(*one, base=None, store=store).tag("one:1")
        samples: dict[str, list[float]] = {"start 1 layer": [], "start 5 layers": []}
        with Sandbox() as sb:
            for image in (image1, image5):  # warm up
                for _ in range(5):
                    sb.run(["true"], image=image).check()
            for _ in range(args.starts):
                samples["start 1 layer"].append(timed(lambda: sb.run(["true"], image=image1).check()))
                samples["start 5 layers"].append(timed(lambda: sb.run(["true"], image=image5).check()))
        for name, values in samples.items():
            print(f"{name:20} {summary(values)}")
        m1, m5 = (statistics.median(v) for v in samples.values())
        print(f"5 layers - 1 layer: {m5 - m1:+.2f} ms (median)")


if __name__ == "__main__":
    main()
