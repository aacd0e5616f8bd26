"""Performance benchmarks: print numbers and ratios (speed targets are checked here, not in tests).

    python -m eval.benchmarks sampling [--model shapesworld] [--batch 64] [--repeats 5]

sampling: wall time to sample a batch at the checkpoint's default settings (prompt encoding,
rollout, VAE decode), per image; and the rollout's overhead over calling the transformer
directly the same number of times on the same inputs (ODE and Flow-GRPO SDE steps).
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=["sampling"])
    parser.add_argument("--model", default="shapesworld")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
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
