"""Compare the loss curves and evaluations of training runs (their metrics.jsonl), step by step.

Used to check that layouts which must train the same model do: N processes against one process with
grad_accum_steps N, FSDP against DDP, a run resumed from a checkpoint against one that never stopped.

    python bench/compare_runs.py checkpoints/ddp2 checkpoints/accum2 [--json out.json]

The first run is the reference. Per other run: the steps both logged, the largest absolute and relative loss
difference over them, the evaluations (top-1, loss, image count) at the steps both evaluated; per run, peak memory
and the median images/s of the logged steps after the first WARMUP_STEPS (compilation, allocator warm-up).
"""

import argparse
import json
import statistics
from pathlib import Path

WARMUP_STEPS = 5


def read_metrics(run_dir: Path) -> dict:
    """{'steps': {step: loss}, 'evals': {step: val}, 'run': the last run record, 'peak_gb': max peak memory,
    'images_per_sec': median over the steps after WARMUP_STEPS (None if there are none)}."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"compare_runs.py: {path} not found; pass run directories (output_dir/run_name)")
    steps, evals, run, peak, rates = {}, {}, {}, None, []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "step":
            steps[record["step"]] = record["loss"]  # a resumed run's later record wins
            if record["step"] > WARMUP_STEPS:
                rates.append(record["images_per_sec"])
            if record.get("peak_memory_gb") is not None:
                peak = max(peak or 0.0, record["peak_memory_gb"])
        elif record["type"] == "eval":
            evals[record["step"]] = record["val"]
        elif record["type"] == "run":
            run = record
    rate = statistics.median(rates) if rates else None
    return {"steps": steps, "evals": evals, "run": run, "peak_gb": peak, "images_per_sec": rate}


def compare(reference: dict, other: dict) -> dict:
    common = sorted(set(reference["steps"]) & set(other["steps"]))
    pairs = [(s, reference["steps"][s], other["steps"][s]) for s in common]
    pairs = [(s, a, b) for s, a, b in pairs if a is not None and b is not None]
    abs_diff = [abs(a - b) for _, a, b in pairs]
    return {
        "steps_compared": len(pairs),
        "first_step": pairs[0][0] if pairs else None,
        "last_step": pairs[-1][0] if pairs else None,
        "max_abs_loss_diff": max(abs_diff, default=None),
        "max_rel_loss_diff": max((d / abs(a) for d, (_, a, _) in zip(abs_diff, pairs) if a), default=None),
        "identical_losses": bool(pairs) and all(d == 0 for d in abs_diff),
        "evals": {
            s: {"reference": reference["evals"][s], "other": other["evals"][s]}
            for s in sorted(set(reference["evals"]) & set(other["evals"]))
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run directories; the first is the reference")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two run directories")
    metrics = {str(run): read_metrics(run) for run in args.runs}
    reference_name = str(args.runs[0])
    reference = metrics[reference_name]
    report = {"reference": reference_name, "runs": {}}
    for name, run in metrics.items():
        row = {
            "num_processes": run["run"].get("num_processes"),
            "global_batch_size": run["run"].get("global_batch_size"),
            "peak_memory_gb": run["peak_gb"],
            "median_images_per_sec": run["images_per_sec"],
        }
        if name != reference_name:
            row |= compare(reference, run)
        report["runs"][name] = row
        diff = (
            f"{row['steps_compared']} steps ({row['first_step']}..{row['last_step']}), max |loss diff| "
            f"{row['max_abs_loss_diff']:.3g} (rel {row['max_rel_loss_diff']:.3g})"
            + (", identical" if row["identical_losses"] else "")
            if name != reference_name and row["steps_compared"]
            else "reference" if name == reference_name else "no common steps"
        )
        peak = f"{row['peak_memory_gb']:.2f} GB" if row["peak_memory_gb"] is not None else "n/a"
        rate = f"{row['median_images_per_sec']:.0f}" if row["median_images_per_sec"] is not None else "n/a"
        print(
            f"{name}: {row['num_processes']} processes, global batch {row['global_batch_size']}, peak {peak}, "
            f"median {rate} img/s: {diff}"
        )
        for step, pair in row.get("evals", {}).items():
            a, b = pair["reference"], pair["other"]
            print(
                f"  eval at step {step}: top-1 {a['top1']:.2f} vs {b['top1']:.2f}, loss {a['loss']:.4f} vs "
                f"{b['loss']:.4f}, images {a['num_images']} vs {b['num_images']}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
