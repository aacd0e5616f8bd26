"""Generating: noise schedules, stateless step functions and the rollout loop.

Model adapters live in `samplers.models` (imported separately).
"""

from samplers.rollout import (
    FlowModel,
    Trajectory,
    Transition,
    random_window,
    rescore,
    rescore_step,
    rollout,
    window_step_types,
)
from samplers.schedules import (
    exponential_time_shift,
    flow_sigmas,
    flux_sigmas,
    image_seq_len_shift_mu,
    shift_sigmas,
)
from samplers.steps import (
    STEPS,
    StepOutput,
    cps_step,
    dance_sde_step,
    euler_ode_step,
    flow_grpo_sde_step,
    gaussian_log_prob,
    get_step,
    guided_sde_step,
    kl_between_means,
)

__all__ = [
    "FlowModel",
    "STEPS",
    "StepOutput",
    "Trajectory",
    "Transition",
    "cps_step",
    "dance_sde_step",
    "euler_ode_step",
    "exponential_time_shift",
    "flow_grpo_sde_step",
    "flow_sigmas",
    "flux_sigmas",
    "gaussian_log_prob",
    "get_step",
    "guided_sde_step",
    "image_seq_len_shift_mu",
    "kl_between_means",
    "random_window",
    "rescore",
    "rescore_step",
    "rollout",
    "shift_sigmas",
    "window_step_types",
]
