"""Rollout samplers: any diffusers scheduler, by class name or instance, set up for rectified-flow models."""

import inspect

import diffusers
from diffusers import SchedulerMixin


def build_flow_sampler(
    sampler: str | SchedulerMixin, base_scheduler: SchedulerMixin, sampler_kwargs: dict | None = None
) -> SchedulerMixin:
    """A scheduler that samples the flow model whose own scheduler is `base_scheduler`.

    An instance is used as is. A class name builds that class from `base_scheduler`'s config; a flow-matching class
    (`FlowMatch*`) samples the flow as it is, any other class that supports flow sigmas (DPM-Solver++, UniPC, DEIS,
    SA-Solver, ...) is switched to `use_flow_sigmas=True, prediction_type="flow_prediction"` with the model's shift.
    `sampler_kwargs` override the resulting config (e.g. `{"solver_order": 1}`).
    """
    if isinstance(sampler, SchedulerMixin):
        if sampler_kwargs:
            raise ValueError(
                "sampler_kwargs only apply to a sampler given by class name; configure the instance itself."
            )
        return sampler
    scheduler_class = getattr(diffusers, sampler, None)
    if not (inspect.isclass(scheduler_class) and issubclass(scheduler_class, SchedulerMixin)):
        raise ValueError(
            f"sampler={sampler!r} is not a diffusers scheduler class (e.g. 'DPMSolverMultistepScheduler')."
        )
    kwargs = {}
    if not sampler.startswith("FlowMatch"):
        if "use_flow_sigmas" not in inspect.signature(scheduler_class.__init__).parameters:
            raise ValueError(
                f"sampler={sampler!r} cannot sample a rectified-flow model: use a FlowMatch* scheduler or one that "
                "supports `use_flow_sigmas` (DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler)."
            )
        kwargs = {
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
            "flow_shift": base_scheduler.config.get("shift", 1.0),
        }
    config = {key: value for key, value in base_scheduler.config.items() if key != "shift" or not kwargs}
    return scheduler_class.from_config(config, **kwargs, **(sampler_kwargs or {}))
