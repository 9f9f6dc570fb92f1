"""Orchestration of ``make bench-claims``: phantoms, fits, measurements, the BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from claims import report
from claims.config import FULL, NEW_TASK, OVERLAP, QUICK, SITE_D, TRAINING_SITES, Budget
from claims.evaluate import class_means, evaluate, kind_mean, specialists_predictor, universal_predictor
from claims.phantoms import write_phantoms
from claims.speed import head_vs_backbone, step_vs_backbone, window_methods
from claims.training import datamodule, fit_specialists, fit_transfer, fit_universal

REPO = Path(__file__).resolve().parents[2]


def machine() -> str:
    """CPU model, cores, torch version and threads."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def universal_rows(budget: Budget, phantoms, root: Path) -> dict:
    """Rows 1, 3 and 6 (the universal model and the specialists), with what row 2 starts from."""
    universal, data, universal_s, checkpoint = fit_universal(budget, phantoms, root)
    print(f"universal model: {budget.universal_steps} steps in {universal_s:.0f} s", flush=True)
    specialists, steps, specialists_s = fit_specialists(budget, phantoms, root)
    print(f"specialists: {steps} steps in {specialists_s:.0f} s", flush=True)
    predictors = {"universal": universal_predictor(universal.model, budget),
                  "specialists": specialists_predictor(specialists, budget)}
    found = {}
    for name, manifests in (("A-C", phantoms.heldout), ("D", phantoms.site_d)):
        started = time.perf_counter()
        found[name] = evaluate(datamodule(budget, phantoms.union, val_manifests=manifests), phantoms.union,
                               predictors, budget.spacing_mm)
        print(f"held-out {name} scored in {time.perf_counter() - started:.0f} s", flush=True)
    step = step_vs_backbone(universal, data, max(3, budget.timing_repeats * 2))
    return {"scores": {site: scores for site, (scores, _) in found.items()},
            "seconds": {site: seconds for site, (_, seconds) in found.items()},
            "fit_s": {"universal": universal_s, "specialists": specialists_s}, "steps": steps,
            "step": step, "checkpoint": checkpoint}


def transfer_row(budget: Budget, phantoms, checkpoint: Path, root: Path) -> dict[str, float]:
    """Row 2: mean Dice of the new task's classes on the held-out sets of sites A-C."""
    fitted = fit_transfer(budget, phantoms, checkpoint, root)
    predictors = {name: universal_predictor(task.model, budget) for name, (task, _) in fitted.items()}
    scores, _ = evaluate(datamodule(budget, NEW_TASK, val_manifests=phantoms.heldout), NEW_TASK, predictors,
                         budget.spacing_mm)
    return {name: kind_mean(scores[name], "dice", tumours=False) for name in fitted}


def row_texts(budget: Budget, found: dict) -> dict[str, tuple[str, str]]:
    """The six table rows: claim -> (the paper, measured here)."""
    scores, seconds, step = (found["universal"][key] for key in ("scores", "seconds", "step"))
    n = report.number
    organ = {model: {site: kind_mean(scores[site][model], "dice", False) for site in scores} for model in scores["A-C"]}
    nsd = {model: kind_mean(scores["A-C"][model], "nsd", False) for model in scores["A-C"]}
    tumour = {model: kind_mean(scores["A-C"][model], "dice", True) for model in scores["A-C"]}
    ratio = sum(s["specialists"] for s in seconds.values()) / sum(s["universal"] for s in seconds.values())
    heads = {(r["backbone"], r["classes"]): r["head_s"] / r["backbone_s"] for r in found["heads"]}
    window = found["window"]

    def window_text(method: str) -> str:
        got = window[method]
        return got["error"] if "error" in got else (f"{got['seconds']:.1f} s, peak RSS {got['peak_rss_gb']:.2f} GB "
                                                    f"({got['rss_before_gb']:.2f} GB before the pass)")

    window_ratio = (f"; time MONAI / streaming {window['monai']['seconds'] / window['streaming']['seconds']:.2f}, "
                    f"peak RSS MONAI / streaming {window['monai']['peak_rss_gb'] / window['streaming']['peak_rss_gb']:.2f}"
                    if all("error" not in got for got in window.values()) else "")
    return {
        "Universal vs dataset-specific": (
            "6x faster inference for the union of classes; universal at least as good",
            f"specialists / universal inference time {ratio:.2f}x; organ Dice {n(organ['universal']['A-C'])} vs "
            f"{n(organ['specialists']['A-C'])}, organ NSD {n(nsd['universal'])} vs {n(nsd['specialists'])}, "
            f"tumour Dice {n(tumour['universal'])} vs {n(tumour['specialists'])} (universal vs specialists)"),
        "Transfer (4 labelled cases)": (
            "the universal backbone transfers better than a random one",
            f"Dice of {', '.join(NEW_TASK)} after {budget.transfer_steps} steps: universal backbone "
            f"{n(found['transfer']['universal backbone'])} vs random init {n(found['transfer']['random init'])}"),
        "Generalisation to an unseen site": (
            "the universal model generalises better",
            "organ Dice sites A-C -> D: " + "; ".join(
                f"{model} {n(organ[model]['A-C'])} -> {n(organ[model]['D'])} "
                f"(drop {n(organ[model]['A-C'] - organ[model]['D'])})" for model in organ)),
        "Dynamic head / backbone time": (
            "the head is cheap, whatever the class count",
            "; ".join(f"{bb} {k}: {heads[(bb, k)]:.2f}" for bb, k in heads)),
        "Sliding window vs MONAI": (
            "(the project's claim) float16 per-class accumulation needs far less memory",
            f"streaming {window_text('streaming')}; MONAI {window_text('monai')}{window_ratio}"),
        "Training step / bare backbone": (
            "(the project's claim) the head and loss add little; the loader is a small share",
            f"step / backbone forward+backward {step['step_s'] / step['backbone_s']:.2f} "
            f"({step['step_s']:.2f} s / {step['backbone_s']:.2f} s); loader share "
            f"{step['loader_s'] / (step['loader_s'] + step['step_s']):.1%} ({step['loader_s']:.3f} s a batch)"),
    }


def setup_text(budget: Budget, phantoms, found: dict) -> str:
    """What was trained and scored, in a paragraph."""
    u = found["universal"]
    steps = ", ".join(f"{name} {count}" for name, count in u["steps"].items())
    return (
        f"{len(phantoms.training)} phantom datasets ({', '.join(phantoms.training)}; {budget.cases_per_dataset} cases each, sites "
        f"{', '.join(TRAINING_SITES)}, each labelling its own subset of {len(phantoms.union)} classes). All models "
        f"share one U-Net ({'..'.join(map(str, budget.channels))}, one residual unit) at {budget.spacing_mm:g} mm "
        f"with {'x'.join(map(str, budget.crop))} crops, 2 a step, AdamW lr {budget.lr:g} with warm-up cosine. "
        f"Universal model: dynamic head over the {len(phantoms.union)} classes, {budget.universal_steps} steps "
        f"({u['fit_s']['universal']:.0f} s), btcv_like drawn 3x as often as each other dataset. Specialists: a "
        f"plain 1x1x1 conv head over their dataset's classes, trained on that dataset only, steps in the same "
        f"proportion ({steps}; {u['fit_s']['specialists']:.0f} s in all). Scored at the model grid (Dice, NSD at "
        f"the catalog's tolerance; organ and tumour means over classes) on {3 * budget.heldout_per_site} held-out "
        f"fully labelled phantoms of sites A-C and the same anatomy scanned at site D ({SITE_D.spacing} mm, noise "
        f"{SITE_D.noise_hu:g} HU, HU offset {SITE_D.hu_offset:+g}); inference is one sliding window "
        f"(overlap {OVERLAP}) per model over the same scans, the universal model and the specialists in turn on "
        f"each scan. Transfer: the new task labels {', '.join(NEW_TASK)} ({budget.transfer_cases} cases); both "
        f"start points fine-tune every weight for {budget.transfer_steps} steps (the universal one through "
        f"`init_from`, which also keeps its head). Head timing: U-Net 16..256 and Swin UNETR (feature size "
        f"{budget.swin_feature}) on a {budget.head_window}^3 window. Sliding window: a plain conv-head network "
        f"({budget.window_classes} classes, the benchmark's U-Net) on a random "
        f"{'x'.join(map(str, budget.window_scan))} volume, {'x'.join(map(str, budget.crop))} windows, each method "
        f"in its own process.")


def section(budget: Budget, phantoms, found: dict, context: dict) -> str:
    """The whole BENCHMARKS.md section."""
    scores = found["universal"]["scores"]
    per_class = {f"{model} {site}": class_means(scores[site][model], "dice")
                 for site in scores for model in scores[site]}
    return "\n\n".join([
        report.TITLE,
        f"`{context['command']}` on {context['machine']}, {context['date']}; load average (1 min) "
        f"{context['load_start']:.2f} at the start and {context['load_end']:.2f} at the end; "
        f"{context['minutes']:.1f} min in all.{context['note']}",
        setup_text(budget, phantoms, found),
        report.claims_table(row_texts(budget, found)),
        "Held-out Dice per class (model grid):",
        report.class_table(per_class),
        "Dynamic head against backbone (forward, float32, best of "
        f"{budget.timing_repeats}):",
        report.head_table(found["heads"]),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench-claims", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps (minutes), for a smoke test")
    parser.add_argument("--steps", type=int, help="universal steps (the specialists' sum); default: the budget's")
    parser.add_argument("--transfer-steps", type=int, help="fine-tuning steps of each transfer model")
    parser.add_argument("--cases", type=int, help="cases per training dataset")
    parser.add_argument("--heldout-per-site", type=int, help="held-out cases per site")
    parser.add_argument("--timing-repeats", type=int, help="repeats of each head and backbone timing (best of)")
    parser.add_argument("--window-scan", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="volume of the sliding-window comparison")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="the file the section goes to")
    parser.add_argument("--note", default="", help="a sentence added to the section's first paragraph")
    return parser.parse_args(argv)


def budget_of(args: argparse.Namespace) -> Budget:
    """The quick or full budget with what the command line overrides."""
    budget = QUICK if args.quick else FULL
    given = {"universal_steps": args.steps, "transfer_steps": args.transfer_steps,
             "cases_per_dataset": args.cases, "heldout_per_site": args.heldout_per_site,
             "timing_repeats": args.timing_repeats,
             "window_scan": tuple(args.window_scan) if args.window_scan else None}
    return dataclasses.replace(budget, **{key: value for key, value in given.items() if value is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = budget_of(args)
    context = {"command": shlex.join(["python", "benchmarks/claims", *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "load_start": os.getloadavg()[0], "note": f" {args.note}" if args.note else ""}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipseg3d-claims-") as folder:
        root = Path(folder)
        phantoms = write_phantoms(root, budget)
        print(f"phantoms written in {time.perf_counter() - started:.0f} s", flush=True)
        found = {"universal": universal_rows(budget, phantoms, root)}
        found["transfer"] = transfer_row(budget, phantoms, found["universal"]["checkpoint"], root)
        print(f"transfer: {found['transfer']}", flush=True)
        found["heads"] = head_vs_backbone(budget)
        found["window"] = window_methods(args.quick, budget.window_scan)
        print(f"sliding window: {found['window']}", flush=True)
        print(json.dumps(found, default=str), flush=True)
        context |= {"load_end": os.getloadavg()[0], "minutes": (time.perf_counter() - started) / 60}
        report.replace_section(args.output, section(budget, phantoms, found, context))
    print(f"wrote '{report.TITLE[3:]}' to {args.output} in {context['minutes']:.1f} min")
    return 0
