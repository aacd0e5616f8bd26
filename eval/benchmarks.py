"""Performance benchmarks: print numbers and ratios (speed targets are checked here, not in tests).

    python -m eval.benchmarks sampling [--model shapesworld] [--batch 64] [--repeats 5]
    python -m eval.benchmarks sampling --family all|flux|... [--batch 8] [--repeats 5]
    python -m eval.benchmarks train-step [--model shapesworld] [--batch 16] [--repeats 5]
    python -m eval.benchmarks rewards [--batch 64] [--repeats 5]

sampling: wall time to sample a batch at the checkpoint's default settings (prompt encoding,
rollout, VAE decode), per image; and the rollout's overhead over calling the transformer
directly the same number of times on the same inputs (ODE and Flow-GRPO SDE steps).
With --family, the same overhead ratio on each diffusers family's tiny model (samplers/models/tiny.py):
the transformer calls of one ODE rollout are recorded (module, arguments) and replayed bare, so the
ratio is the adapter's own cost per step (packing, ids, guidance arithmetic, expert choice) plus the
sampler's, on models whose transformer is tiny (the ratio shrinks as the transformer grows).
train-step: one Flow-GRPO training pass (re-score a stored SDE transition with CFG, clipped
ratio loss, backward into LoRA r 16) against the bare transformer forward + backward on the
same doubled batch; and the extra cost of the KL term's reference forward.
rewards: images/s of each toy-scale reward that is registered and loads offline (ShapesWorld
verifier, quality, saturation, artefact classifier, ShapesWorld CLIP / VLM rewards), on 64 px renders.
Run it on an idle machine: another job on the same cores distorts every number.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def bench_sampling(model_spec: str = "shapesworld", batch: int = 64, repeats: int = 5, threads: int = 2) -> dict:
    from eval.shapes import prompts
    from samplers.generate import generate, sample_noise
    from samplers.models import load_model
    from samplers.rollout import rollout
    from samplers.schedules import flow_sigmas

    torch.set_num_threads(threads)
    model = load_model(model_spec)
    d = model.defaults
    texts = [m["prompt"] for m in prompts("test")]
    texts = [texts[i % len(texts)] for i in range(batch)]
    seeds = list(range(batch))

    total = _timed(lambda: generate(model, texts, seeds, batch_size=batch), repeats)

    cond = model.encode_prompt(texts)
    noise = sample_noise(seeds, model.latent_shape())
    sigmas = flow_sigmas(d["num_steps"], shift=d["shift"])
    g = d["guidance"]
    # the same transformer calls as a rollout with CFG: a doubled batch per step
    x2 = torch.cat([noise, noise])
    embeds = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])
    pooled = torch.cat([cond.negative_pooled, cond.pooled])

    def direct():
        for sigma in sigmas[:-1].tolist():
            model.transformer(hidden_states=x2, timestep=torch.full((2 * batch,), sigma * 1000),
                              encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)

    def ode():
        rollout(model, cond, sigmas, step_types="ode", guidance=g, initial_noise=noise)

    def sde():
        rollout(model, cond, sigmas, step_types="flow_grpo_sde", guidance=g, initial_noise=noise,
                generator=torch.Generator().manual_seed(0))

    # interleaved repeats: slow drifts of the machine hit all three alike
    runs = {"direct": [], "ode": [], "sde": []}
    for fn in (direct, ode, sde):
        fn()
    for _ in range(repeats):
        for name, fn in (("direct", direct), ("ode", ode), ("sde", sde)):
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    t_direct, t_ode, t_sde = (statistics.median(runs[k]) for k in ("direct", "ode", "sde"))
    t_decode = _timed(lambda: model.decode(noise), repeats)
    return {
        "batch": batch, "num_steps": d["num_steps"], "guidance": g, "threads": threads,
        "sample_batch_s": total, "per_image_ms": 1000 * total / batch, "decode_s": t_decode,
        "transformer_direct_s": t_direct, "rollout_ode_s": t_ode, "rollout_sde_s": t_sde,
        "ode_overhead": t_ode / t_direct - 1, "sde_overhead": t_sde / t_direct - 1,
    }


# family -> (tiny builder name, builder kwargs, guidance, negative prompt or None)
FAMILY_BENCH = {
    "flux": ("tiny_flux", {}, 3.5, None),
    "flux_kontext": ("tiny_flux", {"kontext": True}, 2.5, None),
    "wan22": ("tiny_wan22", {}, 4.0, ""),
    "qwen_image": ("tiny_qwen_image", {}, 4.0, " "),
    "z_image": ("tiny_z_image", {}, 5.0, ""),
    "hunyuan_video": ("tiny_hunyuan_video", {}, 6.0, None),
    "flux2_klein": ("tiny_flux2_klein", {}, 4.0, ""),
    "flux2": ("tiny_flux2", {}, 4.0, None),
}


@torch.inference_mode()
def bench_family_sampling(family: str, batch: int = 8, num_steps: int = 8, repeats: int = 5,
                          threads: int = 2) -> dict:
    """ODE rollout of a family's tiny model vs replaying the exact transformer calls it made."""
    from samplers.models import tiny
    from samplers.rollout import rollout
    from samplers.schedules import flow_sigmas

    torch.set_num_threads(threads)
    builder, kwargs, guidance, negative = FAMILY_BENCH[family]
    model = getattr(tiny, builder)(**kwargs)
    prompts = [f"a photo of {n} red circles next to a blue square" for n in range(batch)]
    extra = {"images": torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))} if "kontext" in family else {}
    cond = model.encode_prompt(prompts, negative_prompt=negative, **extra)
    noise = torch.randn((batch, *model.latent_shape()), generator=torch.Generator().manual_seed(0))
    # the pipeline's schedule where the adapter has one (Wan: the shifted grid of its scheduler)
    sigmas = (model.sigmas(num_steps) if hasattr(model, "sigmas")
              else flow_sigmas(num_steps, shift=model.defaults["shift"]))
    modules = [m for m in (model.transformer, getattr(model, "transformer_2", None)) if m is not None]
    calls = []

    def record(module, args, kwargs):
        calls.append((module, args, dict(kwargs)))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    rollout(model, cond, sigmas, step_types="ode", guidance=guidance, initial_noise=noise)
    for hook in hooks:
        hook.remove()

    def direct():
        for module, args, kwargs in calls:
            module(*args, **kwargs)

    def ode():
        rollout(model, cond, sigmas, step_types="ode", guidance=guidance, initial_noise=noise)

    runs = {"direct": [], "ode": []}
    direct(), ode()
    for _ in range(repeats):
        for name, fn in (("direct", direct), ("ode", ode)):
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    t_direct, t_ode = statistics.median(runs["direct"]), statistics.median(runs["ode"])
    return {"family": family, "batch": batch, "num_steps": num_steps, "transformer_calls": len(calls),
            "transformer_direct_s": t_direct, "rollout_ode_s": t_ode, "ode_overhead": t_ode / t_direct - 1}


def bench_train_step(model_spec: str = "shapesworld", batch: int = 16, repeats: int = 5, threads: int = 2) -> dict:
    from align.losses import clipped_policy_loss, flow_grpo_kl
    from eval.shapes import prompts
    from samplers.generate import sample_noise
    from samplers.models import load_model
    from samplers.rollout import rescore_step, rollout
    from samplers.schedules import flow_sigmas

    torch.set_num_threads(threads)
    model = load_model(model_spec)
    model.requires_grad_(False)
    model.add_lora(rank=16, alpha=32)
    lora = [p for n, p in model.transformer.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    d = model.defaults
    texts = [m["prompt"] for m in prompts("train")][:batch]
    cond = model.encode_prompt(texts)
    with torch.no_grad():
        traj = rollout(model, cond, flow_sigmas(d["num_steps"], shift=d["shift"]), step_types="flow_grpo_sde",
                       guidance=d["guidance"], initial_noise=sample_noise(list(range(batch)), model.latent_shape()),
                       generator=torch.Generator().manual_seed(0))
    step = 1
    advantages = torch.randn(batch)
    x2 = torch.cat([traj.latents[:, step]] * 2)
    sigma2 = torch.full((2 * batch,), float(traj.sigmas[step]) * 1000)
    embeds, pooled = cond.cfg_pair()

    def bare():
        out = model.transformer(hidden_states=x2, timestep=sigma2, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]
        out.float().square().mean().backward()

    def grpo():
        new = rescore_step(model, cond, traj, step)
        loss, _ = clipped_policy_loss(new.log_prob, traj.log_probs[:, step], advantages, 1e-4)
        loss.backward()

    def grpo_kl():
        with torch.no_grad(), model.lora_disabled():
            ref = rescore_step(model, cond, traj, step)
        new = rescore_step(model, cond, traj, step)
        loss, _ = clipped_policy_loss(new.log_prob, traj.log_probs[:, step], advantages, 1e-4)
        (loss + 0.04 * flow_grpo_kl(new.mean, ref.mean, new.noise_scale).mean()).backward()

    runs = {"bare": [], "grpo": [], "grpo_kl": []}
    fns = {"bare": bare, "grpo": grpo, "grpo_kl": grpo_kl}
    for fn in fns.values():
        fn()
    for _ in range(repeats):  # interleaved, so slow drifts of the machine hit all alike
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in runs.items()}
    return {"batch": batch, "threads": threads, "bare_s": t["bare"], "grpo_s": t["grpo"], "grpo_kl_s": t["grpo_kl"],
            "grpo_ratio": t["grpo"] / t["bare"], "grpo_kl_ratio": t["grpo_kl"] / t["bare"]}


TOY_REWARDS = ("shapes_geneval", "shapes_quality", "shapes_saturation", "artifact_classifier",
               "shapes_clip_score", "shapes_prompt_echo")


@torch.no_grad()
def bench_rewards(batch: int = 64, repeats: int = 5, threads: int = 2, names=TOY_REWARDS) -> list[dict]:
    """Throughput of each toy-scale reward on `batch` ShapesWorld renders of test prompts (64 px).

    Returns one dict per name: {"name", "status", "images_per_s", "ms_per_image"}; status is "ok",
    "not registered", or why it did not load (everything here must load offline).
    """
    import numpy as np

    from eval.shapes import prompts, render, scene_for_prompt
    from rewards import build_reward, registered_rewards

    torch.set_num_threads(threads)
    metas = prompts("test")
    metas = [metas[i % len(metas)] for i in range(batch)]
    images = np.stack([render(scene_for_prompt(m, rng=i)) for i, m in enumerate(metas)])
    samples = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # [B, 3, 64, 64]
    texts = [m["prompt"] for m in metas]
    registered = registered_rewards()
    results = []
    for name in names:
        if name not in registered:
            results.append({"name": name, "status": "not registered"})
            continue
        try:
            reward = build_reward(name)
            reward(samples[:2], texts[:2])
        except Exception as err:  # a benchmark reports what is missing and goes on
            results.append({"name": name, "status": f"did not load: {type(err).__name__}: {err}"[:160]})
            continue
        seconds = _timed(lambda: reward(samples, texts), repeats)
        results.append({"name": name, "status": "ok", "images_per_s": batch / seconds,
                        "ms_per_image": 1000 * seconds / batch})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=["sampling", "train-step", "rewards"])
    parser.add_argument("--model", default="shapesworld")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 (sampling, rewards), 16 (train-step)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", default=None, choices=["all", *FAMILY_BENCH],
                        help="sampling: the overhead check on a diffusers family's tiny model (default batch 8)")
    args = parser.parse_args(argv)
    if args.name == "sampling" and args.family:
        families = list(FAMILY_BENCH) if args.family == "all" else [args.family]
        batch = args.batch or 8
        print(f"ODE rollout vs the same transformer calls replayed bare, tiny models, batch {batch}, 8 steps "
              f"({args.threads} threads):")
        for family in families:
            r = bench_family_sampling(family, batch, 8, args.repeats, args.threads)
            print(f"  {family:<14} {r['transformer_calls']:3d} calls  direct {r['transformer_direct_s']:.3f} s  "
                  f"rollout {r['rollout_ode_s']:.3f} s  overhead {100 * r['ode_overhead']:+.1f}% (goal <= 5%)")
        return
    if args.name == "rewards":
        batch = args.batch or 64
        print(f"reward throughput on {batch} ShapesWorld renders (64 px), {args.threads} threads:")
        for r in bench_rewards(batch, args.repeats, args.threads):
            if r["status"] == "ok":
                print(f"  {r['name']:<22} {r['images_per_s']:8.1f} images/s  ({r['ms_per_image']:.2f} ms/image)")
            else:
                print(f"  {r['name']:<22} skipped: {r['status']}")
        return
    if args.name == "train-step":
        r = bench_train_step(args.model, args.batch or 16, args.repeats, args.threads)
        print(f"one Flow-GRPO training pass, {r['batch']} samples with CFG, LoRA r 16 ({r['threads']} threads):")
        print(f"  bare transformer forward + backward: {r['bare_s']:.3f} s")
        print(f"  re-score + clipped loss + backward:  {r['grpo_s']:.3f} s  = {r['grpo_ratio']:.3f}x (goal <= 1.15x)")
        print(f"  ... + KL (reference forward):        {r['grpo_kl_s']:.3f} s  = {r['grpo_kl_ratio']:.3f}x")
        return
    args.batch = args.batch or 64
    result = bench_sampling(args.model, args.batch, args.repeats, args.threads)
    print(f"sampling {result['batch']} images, {result['num_steps']} steps, CFG {result['guidance']} "
          f"({result['threads']} threads):")
    print(f"  total (encode + rollout + decode): {result['sample_batch_s']:.3f} s "
          f"= {result['per_image_ms']:.1f} ms/image (target <= 3 s per 64)")
    print(f"  VAE decode: {result['decode_s']:.3f} s")
    print(f"  transformer called directly: {result['transformer_direct_s']:.3f} s")
    print(f"  ODE rollout: {result['rollout_ode_s']:.3f} s  overhead {100 * result['ode_overhead']:+.1f}% "
          f"(goal <= 5%)")
    print(f"  Flow-GRPO SDE rollout: {result['rollout_sde_s']:.3f} s  overhead {100 * result['sde_overhead']:+.1f}%")


if __name__ == "__main__":
    main()
