"""`align train-exevrm`: fine-tune a video execution judge (the "video_exec" reward).

    align train-exevrm                                  # tiny judge on synthetic GUI videos (~30 CPU-min)
    align train-exevrm --data train.jsonl --test test.jsonl --model Qwen/Qwen3-VL-8B-Instruct --out runs/exevrm

Data: JSONL rows {"video": path (relative to the JSONL's folder), "instruction": str, "label": 0|1,
"interval": [s, e] seconds (optional, failures), "description": what the video carries out (optional; the
auxiliary describe task, --describe-weight)}. Without --data, synthetic GUI execution videos
(eval/gui_videos.py) are generated into --workdir (train and held-out test sets, different seeds).
After training, the judge is evaluated on the test set with and without token pruning
(accuracy, recall, temporal IoU, kept-token ratio, forward-time ratio) and saved to --out with
its settings and these metrics in video_exec.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from eval.gui_videos import evaluate_judge, generate_dataset, vocabulary
from rewards.video_exec import (EXEC_TEMPLATE, SETTINGS_FILE, SHIPPED_JUDGE_DIR, VideoExecJudge, judge_settings,
                                 save_judge, tiny_video_vlm, train_video_judge)

# The tiny judge is trained from scratch: the bare instruction is the question (after a space, so that each of
# its words is one token of the tiny tokenizer).
TINY_TEMPLATE = " {instruction}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`align train-exevrm` options (defaults = the shipped tiny judge's run)."""
    parser.add_argument("--data", type=Path, help="training JSONL (default: synthetic GUI videos in --workdir)")
    parser.add_argument("--test", type=Path, help="held-out JSONL (default: synthetic, other seed)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/exevrm_data"),
                        help="where synthetic videos are written (reused if present)")
    parser.add_argument("--train-videos", type=int, default=1600)
    parser.add_argument("--test-videos", type=int, default=400)
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (built from a config) or a hub id / folder; a judge saved by this command "
                             "(e.g. the shipped one) is fine-tuned further with its own question and pixel budget")
    parser.add_argument("--out", type=Path, default=SHIPPED_JUDGE_DIR, help="output folder")
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--interval-weight", type=float, default=0.0,
                        help="weight of the deviation-interval tokens of failed examples (0: judgement only)")
    parser.add_argument("--describe-weight", type=float, default=1.0,
                        help="weight of the auxiliary describe task (half of each batch asks what the video "
                             "carries out; needs a 'description' in the rows; 0: off)")
    parser.add_argument("--prune-fraction", type=float, default=1.0,
                        help="fraction of training batches run with token pruning")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=16)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="pixel budget per frame (default: 112 x 84 = 4 x 3 visual tokens per frame pair for "
                             "the tiny judge, 640 x 480 for a hub model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)


def _rows(path: Path) -> tuple[list[dict], Path]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no rows")
    for number, row in enumerate(rows, 1):
        missing = {"video", "instruction", "label"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number}: missing {sorted(missing)}")
    return rows, path.parent


def evaluate_saved(folder: Path, test_rows: list[dict], test_root: Path) -> dict:
    """The saved judge on held-out rows, with and without token pruning: accuracy, recall,
    temporal IoU, kept-token ratio, forward seconds; the accuracy drop (points) and forward-time
    ratio of pruning."""
    metrics = {}
    for label, pruning in (("pruned", True), ("unpruned", None)):
        metrics[label] = evaluate_judge(VideoExecJudge(folder, pruning=pruning), test_rows, test_root)
        print(label, json.dumps(metrics[label]))
    metrics["accuracy_drop_points"] = 100 * (metrics["unpruned"]["accuracy"] - metrics["pruned"]["accuracy"])
    metrics["forward_time_ratio"] = metrics["pruned"]["forward_seconds"] / metrics["unpruned"]["forward_seconds"]
    return metrics


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.data is None:
        for split, num, seed in (("train", args.train_videos, 1), ("test", args.test_videos, 2)):
            if not (args.workdir / split / "data.jsonl").is_file():
                print(f"writing {num} synthetic {split} videos to {args.workdir / split}")
                generate_dataset(args.workdir / split, num, seed=seed)
        args.data = args.workdir / "train" / "data.jsonl"
        args.test = args.test or args.workdir / "test" / "data.jsonl"
    train_rows, train_root = _rows(args.data)
    saved = judge_settings(args.model)  # a judge saved by this command: go on with its question and pixel budget
    args.max_pixels = args.max_pixels or saved.get("max_pixels") or (112 * 84 if args.model == "tiny" else 640 * 480)
    if args.model == "tiny":
        model, processor = tiny_video_vlm(max_pixels=args.max_pixels, seed=args.seed, words_from=vocabulary())
        template = TINY_TEMPLATE
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from samplers.progress import status

        status(f"loading model {args.model} ...")
        model = AutoModelForImageTextToText.from_pretrained(args.model)
        processor = AutoProcessor.from_pretrained(args.model)
        template = saved.get("template", EXEC_TEMPLATE)
    print(f"training on {len(train_rows)} rows, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    describe = args.describe_weight
    if describe > 0 and not any(row.get("description") for row in train_rows):
        print(f"{args.data}: no row has a 'description': the describe task is off")
        describe = 0.0
    history = train_video_judge(model, processor, train_rows, steps=args.steps, batch_size=args.batch, lr=args.lr,
                                prune_fraction=args.prune_fraction, template=template, fps=args.fps,
                                interval_weight=args.interval_weight,
                                describe_weight=describe,
                                max_frames=args.max_frames, max_pixels=args.max_pixels, root=train_root,
                                seed=args.seed)
    settings = {"template": template, "yes_words": ["Yes"], "no_words": ["No"], "pruning": True, "fps": args.fps,
                "max_frames": args.max_frames, "max_pixels": args.max_pixels,
                "training": {"command": "align train-exevrm " + " ".join(
                    f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                    if k in ("steps", "batch", "lr", "seed", "model", "prune_fraction", "interval_weight", "describe_weight")
                    and v is not None),
                    "rows": len(train_rows), "seconds": round(history["seconds"], 1),
                    "final_loss": float(np.mean(history["losses"][-50:]))}}
    if "training" in saved:  # fine-tuned from a saved judge: keep how that one was made
        settings["training"]["base"] = saved["training"]
    out = save_judge(model, processor, args.out, settings)
    if args.test is not None:
        settings["metrics"] = evaluate_saved(out, *_rows(args.test))
        (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    print(f"saved the judge to {out}")
    return settings
