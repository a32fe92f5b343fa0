"""Per-step overhead and peak memory of each method against plain fine-tuning (regtune.bench.overhead).

    python benchmarks/overhead.py --out benchmarks/results/overhead_cpu.md
    python benchmarks/overhead.py --methods transfer --memory --out benchmarks/results/overhead_transfer_cpu.md
    python benchmarks/overhead.py --framework --out benchmarks/results/framework_cpu.md
    python benchmarks/overhead.py --device cuda --img-size 224 --batch-size 64 --out benchmarks/results/overhead_cuda.md
    python benchmarks/overhead.py --framework --device cuda --precision bf16-mixed --num-workers 8 --img-size 224 \
        --batch-size 64 --out benchmarks/results/framework_cuda_lite0.md
"""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch

from regtune.bench.overhead import (
    METHOD_SETS,
    OverheadSettings,
    framework_table,
    measure_framework_overhead,
    measure_overhead,
    measure_peak_rss,
    measure_term_cost,
    overhead_table,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = OverheadSettings()
    parser.add_argument("--backbone", default=defaults.backbone, help="timm model name")
    parser.add_argument("--pretrained", default=defaults.pretrained,
                        help="weight source (auto: the offline weights where regtune has them); none: random weights, "
                             "for a backbone without offline weights (timing does not depend on the values)")
    parser.add_argument("--img-size", type=int, default=defaults.img_size, help="input resolution (pixels)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per training step")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="interleaved rounds (median reported)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--methods", choices=sorted(METHOD_SETS), default="seed",
                        help="seed: FMR, AdaRand, RandReg, FNP, MaxEnt, head penalties, margins; transfer: L2-SP, "
                             "DELTA, BSS, Co-Tuning, LwF, StochNorm")
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="only these rows of the set (ft is always first)")
    parser.add_argument("--terms-only", action="store_true",
                        help="only time each method's terms alone on one recorded step (fast, precise profile)")
    parser.add_argument("--memory", action="store_true",
                        help="on CPU, also the peak resident memory of each method in its own process")
    parser.add_argument("--framework", action="store_true",
                        help="regtune fit's own overhead: its steps and epochs against a bare PyTorch loop")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true",
                        help="with --framework: both loops in this precision (bf16-mixed: bfloat16 autocast)")
    parser.add_argument("--num-workers", type=int, default=0, help="with --framework: data-loading processes")
    parser.add_argument("--steps-per-epoch", type=int, default=12, help="with --framework: steps of each epoch")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[overhead] %(message)s")
    methods = METHOD_SETS[args.methods]
    if args.only:
        unknown = sorted(set(args.only) - {m.label for m in methods})
        if unknown:
            parser.error(f"--only: unknown label(s) {', '.join(unknown)}; known: {', '.join(m.label for m in methods)}")
        methods = tuple(m for m in methods if m.label == methods[0].label or m.label in args.only)
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"CPU, {torch.get_num_threads()} threads")
    try:
        settings = OverheadSettings(backbone=args.backbone, pretrained=args.pretrained, img_size=args.img_size,
                                    batch_size=args.batch_size,
                                    steps=args.steps, rounds=args.rounds, device=args.device)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    if args.framework:
        result = measure_framework_overhead(settings, steps_per_epoch=args.steps_per_epoch,
                                            precision=args.precision, num_workers=args.num_workers)
        table = (f"{args.backbone}, {args.img_size} px, batch {args.batch_size}, {args.precision}, "
                 f"{args.num_workers} loader processes; {device}; torch {torch.__version__}; "
                 f"{platform.node()}\n\n" + framework_table(result))
        print(table)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table + "\n")
        return
    if args.terms_only:
        terms = measure_term_cost(methods, settings)
        table = (f"{args.backbone}, {args.img_size} px, batch {args.batch_size}; {device}; "
                 f"torch {torch.__version__}\n\n"
                 "Milliseconds each method's own terms (criterion and regularizers, forward + backward, with whatever "
                 "they run besides) add to one training step, timed alone on a recorded step (median of "
                 f"{settings.term_repeats}), minus plain cross-entropy's.\n\n"
                 "| method | terms alone (ms / step) |\n|---|---:|\n"
                 + "\n".join(f"| {k} | {v:.2f} |" for k, v in terms.items()))
        print(table)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table + "\n")
        return
    results = measure_overhead(methods, settings)
    terms = measure_term_cost(methods, settings)
    rss = None
    if args.memory and args.device == "cpu":
        rss = measure_peak_rss(methods, settings)
    header = (f"{args.backbone}, {args.img_size} px, batch {args.batch_size}, {args.steps} steps x {args.rounds} "
              f"interleaved rounds; {device}; torch {torch.__version__}; {platform.node()}\n\n")
    table = header + overhead_table(results, rss, terms)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
