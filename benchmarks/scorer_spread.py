"""How much the yardstick itself moves: the same samples scored by the cached classifier of quality.py, ablation.py
and sampler_quality.py and by classifiers trained from other seeds with the same recipe.

    python benchmarks/scorer_spread.py --cache benchmarks/cache --seeds 0 1 \\
        --samples flow=benchmarks/work/ablation/flow/samples_ddim50/samples.npz edm=... \\
        --out benchmarks/results/scorer_spread_cpu.json

Every classifier trains on the same Fashion-MNIST images for the same epochs (``scoring.train_classifier``) on one
thread; the cached one (``--cache``, trained there as the benchmarks train it) is scored beside them. Each set of
samples gets its FID and the FIDs of its halves under each classifier: how far the FIDs of one set move between
classifiers, against how far two sets stay apart under each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import ROOT, write_json
from scoring import at_28, classifier, fashion, npz_images, scores, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", nargs="+", required=True, metavar="NAME=NPZ", help="sample.py's samples.npz")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1], help="classifiers trained from these seeds")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache", help="the benchmarks' classifier")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "scorer_spread")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scorer_spread.json")
    args = parser.parse_args()
    samples = dict(item.split("=", 1) for item in args.samples)
    device = torch.device("cpu")
    data = fashion(args.work / "data")
    reference = data[2][: len(data[2]) // 2]  # as ablation.py and quality.py score
    nets = {"cache": classifier(args.cache, data, device)}
    torch.set_num_threads(1)
    for seed in args.seeds:
        nets[f"seed {seed}"] = train_classifier(data, device, seed)
    report = {"classifier_test_accuracy": {name: accuracy for name, (_, accuracy) in nets.items()}, "fid": {}}
    for name, path in samples.items():
        images = at_28(npz_images(Path(path)))
        report["fid"][name] = {}
        for label, (net, _) in nets.items():
            result = scores(net, images, reference, device)
            report["fid"][name][label] = {"fid": result["fid"], "fid_halves": result["fid_halves"]}
        print(name, {label: round(r["fid"], 2) for label, r in report["fid"][name].items()}, flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
