"""A run leaves what it is given, and the process, as they were: a pipeline passed in keeps its scheduler and progress
bars (docs/trainer.md lists what training changes in it), and settings of the whole process (torch._dynamo's, PIL's)
are changed only while they are needed, then restored."""

import numpy as np
import torch
from PIL import Image
from test_reward_server import running

from trl_nft import DiffusionNFTTrainer, build_tiny_sd3
from trl_nft.forwards import RECOMPILE_LIMIT, compiled_blocks_settings
from trl_nft.rewards.jpeg import jpeg_compressibility
from trl_nft.rewards.server import RequestLimits, create_app


def test_a_pipeline_passed_in_keeps_its_scheduler_and_progress_bars(make_config, prompts_dataset):
    pipeline = build_tiny_sd3()
    pipeline.set_progress_bar_config(desc="mine")
    scheduler, config = pipeline.scheduler, dict(pipeline.config)
    evaluation = prompts_dataset.select(range(2))
    args = make_config(max_steps=1, eval_sampler="FlowMatchEulerDiscreteScheduler")
    trainer = DiffusionNFTTrainer(
        pipeline, "jpeg_incompressibility", args=args, train_dataset=prompts_dataset, eval_dataset=evaluation
    )
    trainer.train()
    trainer.evaluate()
    trainer.save_model()

    assert pipeline.scheduler is scheduler and dict(pipeline.config) == config
    assert pipeline._progress_bar_config == {"desc": "mine"}
    # The trainer samples with its own sampler, in its own view of the pipeline, which shares the components.
    assert type(trainer.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    # What training changes, as docs/trainer.md says: the denoiser is trained in place, its trained adapter active.
    assert pipeline.transformer is trainer.pipeline.transformer
    assert pipeline.transformer.active_adapters() == ["default"]
    image = pipeline("a photo", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.isfinite(image.images).all()


def test_compiled_blocks_raise_dynamos_recompile_limit_only_while_they_run():
    before = torch._dynamo.config.recompile_limit
    with compiled_blocks_settings(True):
        assert torch._dynamo.config.recompile_limit == max(before, RECOMPILE_LIMIT)
    assert torch._dynamo.config.recompile_limit == before
    with compiled_blocks_settings(False):
        assert torch._dynamo.config.recompile_limit == before


def test_the_reward_server_raises_pils_pixel_limit_only_while_it_serves():
    before = Image.MAX_IMAGE_PIXELS
    app = create_app({"jpeg": jpeg_compressibility}, limits=RequestLimits(max_image_pixels=3 * before))
    assert Image.MAX_IMAGE_PIXELS == before
    with running(app):
        assert Image.MAX_IMAGE_PIXELS == 3 * before  # PIL opens what the server accepts
    assert Image.MAX_IMAGE_PIXELS == before
