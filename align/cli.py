"""The `align` command line: one entry point, a subcommand per job.

    align sample [CONFIG] [--prompt TEXT ...] [--num N] [--out PATH] [key=value ...]
    align score FOLDER [--reward NAME[:WEIGHT] ... | --reward-config YAML] [--out results.csv|.jsonl]
    align pretrain-toy [--out DIR]
    align train CONFIG [key=value ...] [--resume]
    align rollout CONFIG [key=value ...]      (offline store of scored reference samples)
    align serve --reward NAME[:key=value,...] [--host H --port P]   (rewards behind an HTTP server)

Bad input (missing files, malformed YAML or JSONL, wrong image sizes, empty prompt lists)
ends with a one-line `align: error: ...` and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError

EXAMPLES = """examples:
  align sample --out grid.png                        # 16 held-out ShapesWorld prompts, one grid
  align sample --prompt "a photo of a red circle" --num 8 --out red.png
  align sample --split test --per-tag 64 --out runs/base && align score runs/base
  align sample configs/shapes/sample.yaml sampler=flow_grpo_sde num_steps=20 --out sde.png
"""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------ sample
def _add_sample(sub) -> None:
    from .config import describe_config
    from .sample import SampleConfig

    p = sub.add_parser("sample", help="generate images or videos (built-in ShapesWorld model by default)",
                       description="Generate images (SD3-family models) or videos (Wan-family models) from a flow "
                                   "model. With no prompts and the ShapesWorld model, prompts cycle through a "
                                   "ShapesWorld split. --num is the total number of samples; prompts are used in "
                                   "turn.",
                       epilog=EXAMPLES + "\nconfig keys (YAML or key=value):\n" + describe_config(SampleConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="sampling YAML (see configs/shapes/sample.yaml); optional")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. num_steps=20 guidance=3")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help=".txt (one per line) or .jsonl (GenEval metadata / captions)")
    p.add_argument("--split", choices=["train", "test"], default="test",
                   help="ShapesWorld split used when no prompts are given (default: test)")
    p.add_argument("--per-tag", type=int, help="ShapesWorld only: this many images per GenEval category "
                   "(balanced evaluation; --num is then ignored)")
    p.add_argument("--num", type=int, help="total images (default: one per prompt, 16 without prompts)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed+i (default 0)")
    p.add_argument("--out", type=Path, default=Path("samples.png"),
                   help="a .png path writes a captioned grid (videos: filmstrips); a folder gets one PNG per "
                        "image or one .mp4 per video + samples.jsonl")
    p.add_argument("--model", help="shortcut for model=... (shapesworld, a folder or a hub id)")
    p.set_defaults(func=_run_sample)


def _run_sample(args) -> None:
    from .config import load_config
    from .sample import SampleConfig, load_sampling_model, read_prompt_file, sample_to, shapesworld_prompts

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # `align sample num_steps=20`: no config file, only overrides
        config, overrides = None, [config] + overrides
    if args.model:
        overrides.append(f"model={args.model}")
    cfg = load_config(SampleConfig, config, overrides)
    items = [{"prompt": p} for p in args.prompt]
    if any(not p.strip() for p in args.prompt):
        raise CLIError("--prompt got an empty string")
    if args.prompts:
        items += read_prompt_file(args.prompts)
    if not items:
        if cfg.model != "shapesworld" and args.per_tag is None:
            raise CLIError("no prompts: pass --prompt TEXT, --prompts FILE or --per-tag N (ShapesWorld prompts)")
        items = shapesworld_prompts(args.split, args.per_tag)
    elif args.per_tag is not None:
        raise CLIError("--per-tag samples ShapesWorld categories; it cannot be combined with --prompt/--prompts")
    if args.per_tag is not None:
        num = len(items)
    else:
        num = args.num if args.num is not None else (16 if not (args.prompt or args.prompts) else len(items))
    from rewards.base import progress_bar

    model = load_sampling_model(cfg)  # says "loading model ..." before the bar starts
    with progress_bar(num, "sampling", unit="samples") as advance:
        out = sample_to(cfg, items, num, args.seed, args.out, progress=advance, model=model)
    print(f"wrote {num} samples to {out}")


# ------------------------------------------------------------------------------ score
SCORE_EXAMPLES = """examples:
  align score runs/base                                     # ShapesWorld verifier (GenEval semantics)
  align score clips/ --reward shapes_saturation --out clips.jsonl
  align score runs/base --reward shapes_geneval:1 --reward shapes_quality:0.5
  align score runs/base --reward my_pkg.rewards:sharpness:2 # import path, weight 2
  align score runs/base --reward-config judge.yaml          # e.g. reward: {name: http_judge, base_url: ..., model: ...}
"""


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="score a folder of images/videos (ShapesWorld verifier or any reward)",
                       description="Score images against their prompts. Without --reward: the ShapesWorld "
                                   "verifier (GenEval semantics: strict correctness and Flow-GRPO partial credit) "
                                   "on a folder written by `align sample --out DIR`. With --reward or "
                                   "--reward-config: any registered reward on every image and video "
                                   "(decord, else PyAV) in the folder, prompts from its samples.jsonl or "
                                   "--metadata if present; unreadable or unscorable files are reported one "
                                   "line each and skipped.",
                       epilog=SCORE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--metadata", type=Path, help="JSONL with file + prompt (+ meta) per line")
    p.add_argument("--out", type=Path, help="per-file results, .csv (default FOLDER/scores.csv) or .jsonl")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--reward", action="append", metavar="NAME[:WEIGHT]",
                       help="a registered reward name or import path pkg.module:attr, optionally :weight; "
                            "repeatable (several are summed with their weights)")
    which.add_argument("--reward-config", type=Path, metavar="YAML",
                       help="a reward spec with constructor arguments: a YAML holding a name/type dict, a "
                            "list (weighted sum) or a `reward:` key (so experiment configs work too)")
    p.add_argument("--batch-size", type=int, default=16, help="files per reward call (default 16)")
    p.add_argument("--frames", type=int, default=16, help="frames read evenly from each video (default 16)")
    p.set_defaults(func=_run_score)


def _run_score(args) -> None:
    if args.reward or args.reward_config:
        _run_reward_score(args)
        return
    from rich.console import Console
    from rich.table import Table

    from eval.score import score_folder, summary_table, write_results

    rows, summary = score_folder(args.folder, args.metadata)
    out = write_results(rows, args.out or args.folder / "scores.csv")
    table = Table(title=f"ShapesWorld verifier: {args.folder}")
    for column in ("category", "n", "strict", "partial"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for row in summary_table(summary):
        table.add_row(*row)
    Console().print(table)
    print(f"wrote per-image scores to {out}")


def parse_reward_arg(text: str) -> dict:
    """``name[:weight]`` -> ``{"name", "weight"}``; the part after the last ':' is a weight only
    if it is a number, so import paths ``pkg.module:attr[:weight]`` work."""
    name, colon, weight = text.rpartition(":")
    if "=" in text:  # name:key=value,... constructor arguments, e.g. remote:url=http://h:8100,reward=NAME
        from rewards.serve import parse_reward_option

        return {"weight": 1.0, **parse_reward_option(text)}
    if colon:
        try:
            return {"name": name, "weight": float(weight)}
        except ValueError:
            pass
    if not text.strip():
        raise CLIError("--reward got an empty name")
    return {"name": text, "weight": 1.0}


def _reward_spec(args):
    """The reward spec named by --reward (repeated: a weighted sum) or read from --reward-config."""
    if args.reward:
        specs = [parse_reward_arg(text) for text in args.reward]
        return specs[0] if len(specs) == 1 else {"type": "weighted_sum", "rewards": specs}
    import yaml

    try:
        spec = yaml.safe_load(args.reward_config.read_text())
    except FileNotFoundError:
        raise CLIError(f"{args.reward_config}: not found") from None
    except yaml.YAMLError as err:
        raise CLIError(f"{args.reward_config}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if isinstance(spec, dict) and "reward" in spec and not {"name", "type"} & set(spec):
        spec = spec["reward"]
    if isinstance(spec, list):
        spec = {"type": "weighted_sum", "rewards": spec}
    if not isinstance(spec, (str, dict)):
        raise CLIError(f"{args.reward_config}: expected a reward name, a dict with name/type, a list or a "
                       "`reward:` key")
    return spec


def _run_reward_score(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from eval.score import list_media, score_media, summarize_scores, write_results
    from rewards import build_reward
    from rewards.base import progress_bar
    from samplers.progress import status

    if args.batch_size < 1 or args.frames < 1:
        raise CLIError("--batch-size and --frames must be >= 1")
    source = "--reward" if args.reward else str(args.reward_config)
    items = list_media(args.folder, args.metadata)  # a bad folder fails before a reward model loads
    try:
        status(f"loading reward {', '.join(args.reward) if args.reward else args.reward_config} ...")
        reward = build_reward(_reward_spec(args))
    except (TypeError, ValueError) as err:
        raise CLIError(f"{source}: {err}") from None
    with progress_bar(len(items), f"scoring with {reward.name}", unit="files") as advance:
        rows = score_media(args.folder, items, reward, batch_size=args.batch_size, num_frames=args.frames,
                           on_error=lambda message: print(f"align: skipped {message}", file=sys.stderr),
                           on_progress=advance)
    out = write_results(rows, args.out or args.folder / "scores.csv")
    table = Table(title=f"{reward.name}: {args.folder}")
    for column in ("column", "scored", "NaN", "mean", "std", "min", "max"):
        table.add_column(column, justify="left" if column == "column" else "right")
    for column, scored, nan, *stats in summarize_scores(rows):
        table.add_row(column, str(scored), str(nan), *(f"{v:.4g}" for v in stats))
    Console().print(table)
    errors = sum(row["error"] is not None for row in rows)
    print(f"wrote per-file scores to {out} ({len(rows) - errors} read, {errors} skipped)")
    if not any(row["score"] is not None for row in rows):
        raise CLIError(f"nothing could be scored: {errors} of {len(rows)} files skipped, the rest scored NaN")


# ------------------------------------------------------------------------------ pretrain-toy
def _add_pretrain(sub) -> None:
    from .pretrain_toy import add_arguments

    p = sub.add_parser("pretrain-toy", help="train the ShapesWorld base model from scratch (CPU, ~50 min)",
                       description="Train the ShapesWorld VAE, text encoders and SD3 transformer from scratch "
                                   "on ShapesWorld renders of train-split prompts. Seeded and reproducible; "
                                   "the defaults are the shipped model's settings.")
    add_arguments(p)
    p.set_defaults(func=_run_pretrain)

    # `align pretrain-video-toy`: the ShapesWorld-Video base model (align/pretrain_video_toy.py)
    from .pretrain_video_toy import add_arguments as add_video_arguments, main as pretrain_video

    v = sub.add_parser("pretrain-video-toy", help="train the ShapesWorld-Video base model from scratch (CPU)",
                       description="Train the ShapesWorld-Video text-to-video model (a WanTransformer3DModel on "
                                   "the image toy's frozen per-frame VAE; its text encoder starts from the image "
                                   "toy's) with rectified-flow matching on clips of train-split prompts, then "
                                   "report held-out direction / strict / partial accuracy from the centroid-"
                                   "tracking verifier. Seeded; the defaults are the shipped model's settings.")
    add_video_arguments(v)
    v.set_defaults(func=pretrain_video)

    # `align train-shapes-clip`: the ShapesWorld CLIP reward model (rewards/shapes_clip.py)
    from rewards.shapes_clip import add_arguments as add_shapes_clip_arguments, main as train_shapes_clip

    q = sub.add_parser("train-shapes-clip", help="train the ShapesWorld CLIP reward model from scratch (CPU, ~15 min)",
                       description="Train a tiny transformers CLIPModel contrastively (with hard negatives) on "
                                   "ShapesWorld renders of train-split prompts, then report its held-out "
                                   "preference accuracy. Seeded; the defaults are the shipped model's settings.")
    add_shapes_clip_arguments(q)
    q.set_defaults(func=train_shapes_clip)

    # `align train-shapes-vlm`: the ShapesWorld captioner behind "shapes_prompt_echo" (rewards/shapes_vlm.py)
    from rewards.shapes_vlm import add_arguments as add_shapes_vlm_arguments, main as train_shapes_vlm

    c = sub.add_parser("train-shapes-vlm", help="train the ShapesWorld captioning VLM (CPU, ~24 min)",
                       description="Train a tiny transformers Qwen2VLForConditionalGeneration for PromptEcho, in "
                                   "two stages. Captioning: ShapesWorld renders of train-split prompts (caption "
                                   "CE + a hinge ranking the true caption above a corrupted one by PromptEcho's "
                                   "own score + probes on the image tokens). Ranking: fine-tune on samples of the "
                                   "base model for train-split prompts, ranked by the verifier's partial credit. "
                                   "Seeded; the defaults are the shipped model's settings. Measure it with "
                                   "`python -m eval.shapes_vlm_report --path OUT`.")
    add_shapes_vlm_arguments(c)
    c.set_defaults(func=train_shapes_vlm)

    # `align train-artifact`: the artefact classifier's head (rewards/artifact.py)
    from rewards.artifact import add_arguments as add_artifact_arguments, main as train_artifact

    a = sub.add_parser("train-artifact", help="train the artifact_classifier reward's head (CPU, a few minutes)",
                       description="Train the small MLP head of the artifact_classifier reward on a frozen "
                                   "backbone (default: the ShapesWorld VAE encoder), with BCE on ShapesWorld renders "
                                   "and base-model samples, clean and corrupted (eval/shapes/artifacts.py); reports "
                                   "held-out AUROC per artefact kind. Seeded; the defaults are the shipped head's.")
    add_artifact_arguments(a)
    a.set_defaults(func=train_artifact)

    # `align train-exevrm`: the video execution judge (rewards/video_exec.py, align/train_exevrm.py)
    from .train_exevrm import add_arguments as add_exevrm_arguments, main as train_exevrm

    e = sub.add_parser("train-exevrm", help="fine-tune the video_exec judge (tiny one on synthetic GUI videos: ~30 CPU-min)",
                       description="Fine-tune a video execution judge on a JSONL of (video, instruction, label[, "
                                   "interval]); without --data, on synthetic GUI screen recordings "
                                   "(eval/gui_videos.py). Reports held-out accuracy, recall, temporal IoU and "
                                   "pruned-vs-unpruned accuracy / forward time.")
    add_exevrm_arguments(e)
    e.set_defaults(func=train_exevrm)

    # `align train-prm`: the latent process reward model (rewards/process_reward.py)
    from rewards.process_reward import add_arguments as add_prm_arguments, main as train_prm

    r = sub.add_parser("train-prm", help="train a latent process reward model from a rollout store (CPU, minutes)",
                       description="Train the latent process reward model r_p(x_t, sigma, prompt) that Euphonium's "
                                   "guided SDE follows: it learns the outcome reward of a rollout store's samples "
                                   "(`align rollout`) from forward-noised latents, then reports its Spearman "
                                   "correlation with the final reward along ODE trajectories of held-out prompts.")
    add_prm_arguments(r)
    r.set_defaults(func=train_prm)


def _run_pretrain(args) -> None:
    from .pretrain_toy import main

    main(args)


# ------------------------------------------------------------------------------ rollout
def _add_rollout(sub) -> None:
    from .config import describe_config
    from .rollout_store import RolloutConfig

    p = sub.add_parser("rollout", help="sample and score K images per prompt into an offline store (for GDRO)",
                       description="Sample K images per prompt with the reference model, score them with every "
                                   "configured reward and write a sharded, checksummed store. Run it again on "
                                   "the same config to finish a store after a crash (finished shards are kept).",
                       epilog="example:\n  align rollout configs/shapes/rollout.yaml num_groups=32\n\n"
                              "config keys (YAML or key=value):\n" + describe_config(RolloutConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="rollout YAML, e.g. configs/shapes/rollout.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. group_size=6")
    p.add_argument("--overwrite", action="store_true", help="delete the store in output_dir and generate it again "
                   "(without it, a store of the same settings is finished, one of other settings refused)")
    p.set_defaults(func=_run_rollout)


def _run_rollout(args) -> None:
    from .config import load_config
    from .rollout_store import RolloutConfig, build_store, store_summary

    cfg = load_config(RolloutConfig, args.config, list(args.overrides) + ["overwrite=true"] * args.overwrite)
    store = build_store(cfg)
    summary = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in store_summary(store).items())
    print(f"rollout store {store.root}: {summary}")


# ------------------------------------------------------------------------------ train
# algorithm name (the YAML's `algorithm:` key) -> module with `train(cfg)`; one row per trainer
TRAINERS = {"flow_grpo": "align.flow_grpo", "crd": "align.crd", "gdro": "align.gdro", "nft": "align.nft",
            "awm": "align.awm"}

TRAIN_EXAMPLES = """examples:
  align train configs/shapes/flow_grpo.yaml
  align train configs/shapes/flow_grpo.yaml variant=fast num_epochs=20 output_dir=runs/fast
  align train configs/shapes/flow_grpo.yaml --resume        # continue from the newest checkpoint
  align train configs/shapes/flow_grpo.yaml --overwrite     # delete the run in output_dir, start again
  align train configs/shapes/flow_grpo.yaml --help-config   # effective config: file + overrides + defaults
  accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
      --dynamo_backend no -m align train configs/shapes/flow_grpo.yaml
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train with an RL / alignment algorithm (dispatches on the YAML's algorithm)",
                       description="Train with the algorithm named by the config's `algorithm:` key "
                                   f"({', '.join(sorted(TRAINERS))}). key=value overrides any config field; "
                                   "`align train CONFIG --help-config` lists them.",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="experiment YAML, e.g. configs/shapes/flow_grpo.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. num_epochs=5 optimizer.lr=1e-5")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    start.add_argument("--overwrite", action="store_true",
                       help="delete the run already in output_dir and start again (without --resume or "
                            "--overwrite, a fresh start into a folder holding checkpoints or metrics is refused)")
    p.add_argument("--help-config", action="store_true",
                   help="with CONFIG: the effective value of every key (file, overrides, defaults) and where it "
                        "came from; without: every trainer's keys, types, defaults and documentation; then exit")
    p.set_defaults(func=_run_train)


def _run_train(args) -> None:
    import importlib

    from .config import config_class_for, describe_config, describe_effective_config, load_any_config

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # `align train algorithm=crd --help-config`: no file, only overrides
        config, overrides = None, [config] + overrides
    overrides += ["resume=true"] * args.resume + ["overwrite=true"] * args.overwrite
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise CLIError(f"expected key=value overrides, got {bad[0]!r}")
    if config is None and not any(o.startswith("algorithm=") for o in overrides):
        if not args.help_config:
            raise CLIError("pass an experiment YAML, e.g. align train configs/shapes/flow_grpo.yaml")
        print("\n".join(describe_config(config_class_for(name)) for name in TRAINERS))  # the defaults
        return
    name, cfg = load_any_config(config, overrides)
    if name not in TRAINERS:
        raise CLIError(f"{config}: algorithm {name!r} is not a training algorithm; "
                       f"trainers: {', '.join(sorted(TRAINERS))}")
    module = importlib.import_module(TRAINERS[name])
    if args.help_config:
        resolve = getattr(module, "resolve_variant_defaults", None)  # the nulls a trainer fills itself
        print(describe_effective_config(cfg, config, overrides, resolve(cfg) if resolve else None), end="")
        return
    module.train(cfg)


# ------------------------------------------------------------------------------ eval
EVAL_EXAMPLES = """examples:
  align eval                                               # GenEval-style on ShapesWorld held-out prompts
  align eval --lora runs/shapes/flow_grpo/final_ema --compare-base --benchmark geneval --benchmark dense
  align eval --lora runs/x/final_ema --compare-base --optimised-reward shapes_saturation --monitor-run runs/x
  align eval --model /sd35 --prompts geneval/evaluation_metadata.jsonl --detector my_pkg.det:detect
  align eval --model /sd35-trained --compare /sd35 --benchmark dense --captions dense.jsonl \\
      --judge http:http://judge:8000/v1@Qwen/Qwen2.5-VL-7B-Instruct
"""


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="benchmarks (GenEval-, DenseAlignBench-style) on one or two checkpoints -> report",
                       description="Sample a checkpoint (and a second with --compare) over benchmarks and write a "
                                   "report folder: metrics.json, summary.md, index.html, tables/, grids/. Rerun the "
                                   "same command after an interruption: finished samples and judgments are kept.",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", action="append", help="geneval (default) and/or dense; repeatable")
    p.add_argument("--model", default="shapesworld", help="checkpoint A: shapesworld (default), toy:test, a diffusers "
                   "folder or hub id")
    p.add_argument("--lora", help="LoRA folder or .safetensors loaded into --model")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--compare", help="reference checkpoint B (A = --model/--lora is the one under test): a LoRA "
                       "(on --model) or a model spec")
    which.add_argument("--compare-base", action="store_true", help="B = --model without the LoRA")
    p.add_argument("--compare-lora", help="LoRA loaded into the --compare model")
    p.add_argument("--out", type=Path, default=Path("reports/eval"), help="report folder (default reports/eval)")
    p.add_argument("--prompts", type=Path, help="GenEval metadata JSONL (default: ShapesWorld --split prompts)")
    p.add_argument("--split", choices=["train", "test"], default="test", help="ShapesWorld split (default test)")
    p.add_argument("--per-tag", type=int, default=64, help="ShapesWorld prompts per category (default 64)")
    p.add_argument("--captions", type=Path, help="dense: JSONL with a 'caption' per line (default: ShapesWorld dense)")
    p.add_argument("--dense-prompts", type=int, default=64, help="dense: ShapesWorld dense prompts (default 64)")
    p.add_argument("--limit", type=int, help="use the first N prompts / captions of a file")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="image i of the plan uses seed+i; also the judge order seed")
    p.add_argument("--judge", default="verifier", help="dense judge: verifier, reward:NAME or http:BASE_URL@MODEL")
    p.add_argument("--both-orders", action="store_true", help="dense: judge every pair in both orders")
    p.add_argument("--detector", help="geneval detector: shapes (default) or pkg.module:attr")
    p.add_argument("--reward", action="append", help="held-out reward scored on the GenEval samples (repeatable; "
                   "default shapes_quality for ShapesWorld models)")
    p.add_argument("--optimised-reward", help="the reward the checkpoint was trained on: scored too, and the hacking "
                   "monitor compares it with the held-out ones from A to B")
    p.add_argument("--monitor-run", type=Path, help="training run folder: replay the hacking monitor over metrics.csv")
    p.add_argument("--num-steps", type=int, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_eval)


def _eval_checkpoint(label: str, model_spec: str, lora: str | None, args):
    from eval.geneval import model_sampler
    from eval.report import Checkpoint

    from .runtime import load_flow_model

    local = model_spec.startswith(("/", ".", "~")) or model_spec.count("/") != 1
    if model_spec not in ("shapesworld",) and not model_spec.startswith("toy:") and local \
            and not Path(model_spec).expanduser().exists():
        raise CLIError(f"checkpoint {label}: model {model_spec!r} not found")
    if lora and not Path(lora).exists():
        raise CLIError(f"checkpoint {label}: LoRA {lora!r} not found")
    try:
        model = load_flow_model(model_spec, args.device)
        if lora:
            model.load_lora(lora)
    except (OSError, KeyError) as err:
        raise CLIError(f"checkpoint {label}: cannot load {model_spec}{' + ' + lora if lora else ''} ({err})") from None
    sampler = model_sampler(model.eval(), num_steps=args.num_steps, guidance=args.guidance, batch_size=args.batch_size)
    return Checkpoint(label, model_spec + (f" + {lora}" if lora else ""), sampler)


def _run_eval(args) -> None:
    from samplers.progress import Progress

    from eval.dense import dense_prompts, load_captions
    from eval.geneval import load_metadata
    from eval.monitor import replay_metrics
    from eval.report import BENCHMARKS, run_suite, tables, write_report
    from rewards import build_reward

    from .metrics import read_metrics_csv
    from .sample import shapesworld_prompts

    benchmarks = list(dict.fromkeys(args.benchmark or ["geneval"]))
    bad = [b for b in benchmarks if b not in BENCHMARKS]
    if bad:
        raise CLIError(f"unknown benchmark {bad[0]!r}; choose from {', '.join(BENCHMARKS)}")
    if "dense" in benchmarks and not (args.compare or args.compare_base):
        raise CLIError("the dense benchmark is pairwise: pass --compare SPEC or --compare-base")
    if args.compare_base and not args.lora:
        raise CLIError("--compare-base compares --model + --lora with --model alone: pass --lora")
    if args.monitor_run and not (args.monitor_run / "metrics.csv").is_file():
        raise CLIError(f"--monitor-run {args.monitor_run}: no metrics.csv there")
    geneval_items = load_metadata(args.prompts)[: args.limit] if args.prompts else \
        shapesworld_prompts(args.split, args.per_tag)
    dense_items = load_captions(args.captions, args.limit) if args.captions else \
        dense_prompts(args.dense_prompts, args.seed)
    toy = args.model == "shapesworld" or args.model.startswith("toy:")
    names = (args.reward or (["shapes_quality"] if toy else [])) + [args.optimised_reward] * bool(args.optimised_reward)
    names = list(dict.fromkeys(names))
    try:
        rewards = {name: build_reward(name) for name in names}
    except (TypeError, ValueError, KeyError) as err:
        raise CLIError(f"--reward: {err}") from None
    checkpoints = [_eval_checkpoint("A", args.model, args.lora, args)]
    if args.compare_base:
        checkpoints.append(_eval_checkpoint("B", args.model, None, args))
    elif args.compare:
        is_lora = args.compare.endswith(".safetensors") or \
            (Path(args.compare) / "pytorch_lora_weights.safetensors").is_file()
        spec, lora = (args.model, args.compare) if is_lora else (args.compare, args.compare_lora)
        checkpoints.append(_eval_checkpoint("B", spec, lora, args))
    run_monitor = None
    if args.monitor_run:
        run_monitor = replay_metrics(read_metrics_csv(args.monitor_run / "metrics.csv")).summary()
    config = {"prompts": str(args.prompts or f"shapesworld:{args.split}:{args.per_tag}"), "limit": args.limit,
              "captions": str(args.captions or f"shapes_dense:{args.dense_prompts}"), "judge": args.judge,
              "num_steps": args.num_steps, "guidance": args.guidance, "detector": args.detector}
    bars: list[Progress] = []  # one task at a time: a new one ends the one before

    def progress(what, total):
        if bars:
            bars.pop().__exit__(None, None, None)
        bars.append(Progress(total, what, unit="items").__enter__())
        return bars[-1].advance

    try:
        results = run_suite(checkpoints, benchmarks, args.out, geneval_items=geneval_items, dense_items=dense_items,
                            images_per_prompt=args.images_per_prompt, seed=args.seed, detector=args.detector,
                            judge=args.judge, both_orders=args.both_orders, rewards=rewards,
                            optimised=args.optimised_reward, batch_size=args.batch_size, config=config,
                            progress=progress, run_monitor=run_monitor)
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)
    paths = write_report(args.out, results)
    for title, header, rows in tables(results)[1:]:
        print(f"\n{title}\n" + "\n".join("  ".join(row) for row in [header, *rows]))
    for key in ("monitor", "run_monitor"):
        for message in (results.get(key) or {}).get("alerts", []):
            print(f"WARNING: {message}", file=sys.stderr)
    print(f"\nreport: {paths['html']} (summary {paths['markdown']})")


# ------------------------------------------------------------------------------ serve
SERVE_EXAMPLES = """examples:
  align serve --reward shapes_geneval --reward shapes_clip_score          # 127.0.0.1:8100, token printed
  GENALIGN_SERVE_TOKEN=... align serve --reward pickscore:device=cuda:1 --host 0.0.0.0 --port 8100
  # then in a training config:  reward: {name: remote, url: http://HOST:8100, reward: pickscore}
  align score runs/base --reward remote:url=http://127.0.0.1:8100,reward=shapes_geneval
"""


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve rewards over HTTP (batched, token-authenticated) for `remote` rewards",
                       description="Serve registered rewards behind an HTTP server (FastAPI + uvicorn): requests for "
                                   "the same reward are merged into batches, a bearer token is required, sizes and "
                                   "time are limited. Training uses them with reward: {name: remote, url: ..., "
                                   "reward: NAME}. See docs/serving.md.",
                       epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from rewards.serve import add_arguments

    add_arguments(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> None:
    from rewards.serve import main

    main(args)


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="genalign: align text-to-image/video flow models "
                                     "with rewards. Every subcommand has --help.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_sample(sub)
    _add_score(sub)
    _add_pretrain(sub)
    _add_rollout(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_serve(sub)
    return parser


def _quiet_library_progress() -> None:
    """Library progress bars (weight loading) would interleave with ours."""
    try:
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "torch" not in sys.modules and argv and not argv[0].startswith("-") and "-h" not in argv \
            and "--help" not in argv:
        # the subcommands import torch / diffusers / transformers (seconds, more on a busy machine): say so
        print(f"align {argv[0]}: importing torch, diffusers, transformers ...", file=sys.stderr, flush=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_library_progress()
    try:
        args.func(args)
    except (CLIError, ConfigError, FileNotFoundError, ValueError) as err:
        # ValueErrors raised by our own input validation carry the file/line; one line, no traceback.
        message = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        print(f"align: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
