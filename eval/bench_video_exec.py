"""Benchmark the video execution judge's token pruning: kept tokens and forward time, pruned vs not.

    python -m eval.bench_video_exec [--model PATH|tiny] [--videos 16] [--batch 4] [--repeats 3]

On synthetic GUI recordings (eval/gui_videos.py, 224 x 168 at 1 fps): the kept visual-token
ratio under STP + TTP (and each alone), the language-model sequence length, and the median wall
time of the judge's forward pass (vision encoder + language model, batch of --batch) with and
without pruning; ratio = pruned / unpruned. Mask computation (STP union-find + TTP) is timed
separately. Default model: the shipped judge if present, else the tiny judge's architecture with
random weights (timing does not depend on the weights). Run it on an idle machine.

``--model 8b-slice``: random weights in the proportions of an 8B judge (ExeVRM-8B is a Qwen3-VL-8B
fine-tune: a 36-layer, 4096-wide language model with 8 key/value heads and a 12288-wide MLP; a
27-layer, 1152-wide vision encoder): every width halved and both depths divided by 9 (4 language
layers, 3 vision layers), so the split of compute between the vision encoder (which sees every
patch) and the language model (which sees only the kept tokens) is about an 8B model's. At the tiny
judge's size the vision encoder and Python overheads dominate and pruning saves little; this
shows what it saves where the language model dominates, as it does in the real judge.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from eval.benchmarks import _timed
from eval.gui_videos import generate_example
from rewards.token_pruning import PruningConfig
from rewards.video_exec import SHIPPED_JUDGE_DIR, VideoBatch, VideoExecJudge, forward_logits, tiny_video_vlm


# Random-weight architectures (tiny_video_vlm arguments): the tiny judge's, and an 8B judge's proportions (see above).
ARCHITECTURES = {
    "tiny": {},
    # vision MLP ratio 4: Qwen3-VL's is 4304 / 1152 = 3.7, and Qwen2VLConfig takes an integer
    "8b-slice": dict(hidden_size=2048, intermediate_size=6144, num_layers=4, num_heads=16, num_kv_heads=4,
                     vision_dim=576, vision_depth=3, vision_heads=8, vision_mlp_ratio=4),
}


def bench_pruning(model: str | None = None, videos: int = 16, batch: int = 4, repeats: int = 3,
                  threads: int = 1, seed: int = 50_000_000) -> dict:
    torch.set_num_threads(threads)
    if model in (None, "auto"):
        model = str(SHIPPED_JUDGE_DIR) if SHIPPED_JUDGE_DIR.is_dir() else "tiny"
    if model in ARCHITECTURES:
        judge = VideoExecJudge(*tiny_video_vlm(**ARCHITECTURES[model]), template="{instruction}")
    else:
        judge = VideoExecJudge(model)
    examples = [generate_example(seed + i) for i in range(videos)]
    frames, texts = [e["frames"] for e in examples], [e["instruction"] for e in examples]
    result = {"model": model, "videos": videos, "batch": batch}
    for label, config in (("stp", PruningConfig(temporal=False)), ("ttp", PruningConfig(spatial=False)),
                          ("stp+ttp", PruningConfig())):
        ratios = torch.cat([VideoBatch(judge.vlm, judge.template, texts[i:i + batch], frames[i:i + batch], config).kept_ratio
                            for i in range(0, videos, batch)])
        result[f"kept_ratio[{label}]"] = float(ratios.mean())
    times = {}
    for label, config in (("unpruned", None), ("pruned", PruningConfig())):
        start = time.perf_counter()
        batches = [VideoBatch(judge.vlm, judge.template, texts[i:i + batch], frames[i:i + batch], config)
                   for i in range(0, videos, batch)]
        result[f"prepare_seconds[{label}]"] = time.perf_counter() - start
        lengths = [int((b.inputs["attention_mask"].bool() & (b.keep if b.keep is not None else True)).sum(1).float().mean())
                   for b in batches]
        result[f"mean_sequence_length[{label}]"] = float(np.mean(lengths))

        @torch.inference_mode()
        def run():
            for b in batches:
                forward_logits(judge.vlm.model, b, (b.inputs["attention_mask"].sum(1) - 1)[:, None])

        times[label] = _timed(run, repeats)
        result[f"forward_seconds[{label}]"] = times[label]
    result["forward_time_ratio"] = times["pruned"] / times["unpruned"]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="auto",
                        help="judge folder / hub id, 'tiny' or '8b-slice' (random weights, see above) or 'auto'")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    result = bench_pruning(args.model, args.videos, args.batch, args.repeats, args.threads)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
