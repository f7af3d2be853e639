"""DiffusionNFT iteration cost and trainer overhead on the SD3.5-Medium architecture, on one GPU.

The pipeline is built offline from configs with random weights (no download: the GPU machine has no network), directly
in bf16 on the GPU: SD3.5-Medium's MMDiT (24 layers, dual attention in the first 13, 2.24B parameters), the SD3 VAE,
CLIP-L, CLIP-G and the T5-XXL encoder. Random weights cost the same FLOPs as trained ones, so the timings hold for the
real model; the reward is the cheap JPEG one, so the numbers are the trainer's and the model's, not a reward model's.
Tokenizers are trl-nft's tiny offline ones, so the encoders' vocabularies (embedding tables only) are small; prompts
are padded to the same fixed lengths as in the real pipeline: 77 CLIP tokens, `max_sequence_length` (128) T5 tokens.

The measurement itself is `run_benchmark` from `benchmarks/overhead.py` (imported as `overhead`: running this script
puts its folder on `sys.path`): the trainer and a direct diffusers/peft implementation of the same iteration, alternated
in one run. Defaults: 512 px, 8 images per iteration (one group of 8), 10-step DPM-Solver++ rollouts, 9 training times,
LoRA r=32, kl_coef 1e-4 and 0. Results are written after each kl_coef, so a run cut short still leaves numbers.

    python benchmarks/sd35_medium_gpu.py                  # on the GPU; JSON to $OUT/sd35m_gpu.json
    python benchmarks/sd35_medium_gpu.py --tiny --device cpu --repeats 1   # same code path, tiny dims, on CPU
"""

import argparse
import os
import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from overhead import add_common_arguments, compile_modes, format_table, parse_common, run_benchmark
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from trl_nft.embedded.tiny import _clip_tokenizer, _t5_tokenizer


# Component sizes of stabilityai/stable-diffusion-3.5-medium (its published configs), and a tiny version with the same
# structure (dual attention, RMS qk-norm, 4-level VAE, gated-GELU T5) for checking the code path on a CPU.
SD35_MEDIUM = {
    "clip_l": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, projection_dim=768
    ),
    "clip_g": dict(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120, projection_dim=1280
    ),
    "t5": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64),
    "transformer": dict(
        sample_size=128,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
    ),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
    "resolution": 512,
}
TINY = {
    "clip_l": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, projection_dim=32
    ),
    "clip_g": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, projection_dim=48
    ),
    "t5": dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
    "transformer": dict(
        sample_size=16,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=4,
        caption_projection_dim=64,
        pos_embed_max_size=32,
        dual_attention_layers=(0, 1),
    ),
    "vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=128),
    "resolution": 128,
}


def build_sd3_pipeline(sizes: dict, device: str, dtype: torch.dtype, seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3 pipeline with random weights, created directly on `device` in `dtype` (no fp32 copy on the CPU first)."""
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    clip_ids = dict(
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype`: half the memory and time of fp32 then cast
    try:
        with torch.device(device):
            text_encoder = CLIPTextModelWithProjection(
                CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_act="quick_gelu", **sizes["clip_l"], **clip_ids)
            )
            text_encoder_2 = CLIPTextModelWithProjection(
                CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_act="gelu", **sizes["clip_g"], **clip_ids)
            )
            text_encoder_3 = T5EncoderModel(
                T5Config(
                    vocab_size=len(t5_tokenizer),
                    feed_forward_proj="gated-gelu",
                    pad_token_id=t5_tokenizer.pad_token_id,
                    eos_token_id=t5_tokenizer.eos_token_id,
                    decoder_start_token_id=0,
                    **sizes["t5"],
                )
            )
            transformer = SD3Transformer2DModel(
                patch_size=2,
                in_channels=16,
                out_channels=16,
                # The joint text sequence is CLIP-L + CLIP-G hidden states zero-padded to T5's width, then T5's.
                joint_attention_dim=sizes["t5"]["d_model"],
                pooled_projection_dim=sizes["clip_l"]["projection_dim"] + sizes["clip_g"]["projection_dim"],
                qk_norm="rms_norm",
                **sizes["transformer"],
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=16,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=1.5305,
                shift_factor=0.0609,
                **sizes["vae"],
            )
    finally:
        torch.set_default_dtype(default_dtype)
    for module in (text_encoder, text_encoder_2, text_encoder_3, transformer, vae):
        module.eval()  # as from_pretrained leaves them (T5's dropout is active in train mode)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="Same architecture with tiny dims (checks the code path).")
    add_common_arguments(parser, batch_size=8, steps=1, repeats=5, compile_default="both")
    default_output = os.path.join(
        os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"), "sd35m_gpu.json"
    )
    parser.add_argument("--output", default=default_output)
    args, bf16 = parse_common(parser)
    if args.device == "cpu" and not args.tiny:
        parser.error("the full SD3.5-Medium architecture needs a GPU; on a CPU, check the code path with --tiny.")
    sizes = TINY if args.tiny else SD35_MEDIUM
    dtype = torch.bfloat16 if bf16 else torch.float32
    resolution = args.resolution or sizes["resolution"]
    model_name = f"SD3.5-Medium architecture{' (tiny dims)' if args.tiny else ''}, random weights"
    print(f"{model_name}, {args.device}, {'bf16' if bf16 else 'fp32'}, {resolution} px", flush=True)
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)

    # Parameter counts from a build on the meta device: instant, no memory.
    counts = {
        name: round(sum(p.numel() for p in module.parameters()) / 1e9, 4)
        for name, module in build_sd3_pipeline(sizes, "meta", dtype).components.items()
        if isinstance(module, torch.nn.Module)
    }
    print(f"parameters (billions): {counts}", flush=True)

    def pipeline_factory() -> StableDiffusion3Pipeline:
        start = time.perf_counter()
        pipeline = build_sd3_pipeline(sizes, args.device, dtype)
        print(f"built a pipeline on {args.device} in {time.perf_counter() - start:.1f} s", flush=True)
        return pipeline

    results = run_benchmark(
        pipeline_factory,
        kl_coefs=tuple(args.kl_coefs),
        compile_modes=compile_modes(args),
        device=args.device,
        bf16=bf16,
        resolution=resolution,
        batch_size=args.batch_size,
        num_generations=args.num_generations,
        num_inference_steps=args.num_inference_steps,
        max_sequence_length=128,
        steps=args.steps,
        repeats=args.repeats,
        model_name=model_name,
        extra_settings={"parameters_billions": counts},
        output=args.output,
    )
    print(format_table(results), flush=True)


if __name__ == "__main__":
    main()
