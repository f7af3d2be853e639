"""Rollout samplers: any diffusers scheduler, by class name or instance, set up for the model's kind of diffusion."""

import inspect

import diffusers
from diffusers import SchedulerMixin


def build_sampler(
    sampler: str | SchedulerMixin,
    base_scheduler: SchedulerMixin,
    sampler_kwargs: dict | None = None,
    flow: bool = True,
) -> SchedulerMixin:
    """A scheduler that samples the model whose own scheduler is `base_scheduler`.

    An instance is used as is. A class name builds that class from `base_scheduler`'s config. For a rectified-flow
    model (`flow=True`), a flow-matching class (`FlowMatch*`) samples the flow as it is, and any other class that
    supports flow sigmas (DPM-Solver++, UniPC, DEIS, SA-Solver, ...) is switched to `use_flow_sigmas=True,
    prediction_type="flow_prediction"` with the model's shift. For a VP model (`flow=False`), flow-matching classes are
    refused. A model whose schedule shifts with the image size (FLUX.1, Qwen-Image: `use_dynamic_shifting`, the
    pipeline passes `mu`) needs a class that takes `mu`. `sampler_kwargs` override the resulting config (e.g.
    `{"solver_order": 1}`).
    """
    if isinstance(sampler, SchedulerMixin):
        if sampler_kwargs:
            raise ValueError(
                "sampler_kwargs only apply to a sampler given by class name; configure the instance itself."
            )
        _check_dynamic_shifting(type(sampler), base_scheduler)
        return sampler
    scheduler_class = getattr(diffusers, sampler, None)
    if not (inspect.isclass(scheduler_class) and issubclass(scheduler_class, SchedulerMixin)):
        raise ValueError(
            f"sampler={sampler!r} is not a diffusers scheduler class (e.g. 'DPMSolverMultistepScheduler')."
        )
    _check_dynamic_shifting(scheduler_class, base_scheduler)
    config, kwargs = dict(base_scheduler.config), {}
    if not flow:
        if sampler.startswith("FlowMatch"):
            raise ValueError(f"sampler={sampler!r} samples rectified-flow models; this is a VP diffusion model.")
    else:
        # The model's shift, under the name its scheduler uses (`shift` for the flow-matching schedulers, `flow_shift`
        # for DPM-Solver, UniPC, ... on flow sigmas: SANA's and Wan's own), passed on under the name the sampler reads.
        shift, flow_shift = config.pop("shift", None), config.pop("flow_shift", None)
        model_shift = shift if shift is not None else flow_shift if flow_shift is not None else 1.0
        if sampler.startswith("FlowMatch"):
            # It predicts the flow velocity as it is: the switches of DPM-Solver or UniPC on flow sigmas are not its own.
            config.pop("use_flow_sigmas", None), config.pop("prediction_type", None)
            kwargs = {"shift": model_shift}
        elif "use_flow_sigmas" not in inspect.signature(scheduler_class.__init__).parameters:
            raise ValueError(
                f"sampler={sampler!r} cannot sample a rectified-flow model: use a FlowMatch* scheduler or one that "
                "supports `use_flow_sigmas` (DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler)."
            )
        else:
            kwargs = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": model_shift}
    return scheduler_class.from_config(config, **{**kwargs, **(sampler_kwargs or {})})


def _check_dynamic_shifting(scheduler_class: type[SchedulerMixin], base_scheduler: SchedulerMixin) -> None:
    if not base_scheduler.config.get("use_dynamic_shifting", False):
        return
    if "mu" not in inspect.signature(scheduler_class.set_timesteps).parameters:
        raise ValueError(
            f"sampler={scheduler_class.__name__!r} cannot sample this model: its noise schedule shifts with the image "
            "size (the pipeline passes `mu`), which this scheduler does not take. Use FlowMatchEulerDiscreteScheduler, "
            "DPMSolverMultistepScheduler, UniPCMultistepScheduler or DEISMultistepScheduler."
        )
