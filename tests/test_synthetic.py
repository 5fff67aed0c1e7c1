import json

import pytest
import torch

from fl_core.config import DDPMConfig, DiffusersConfig, SyntheticConfig
from fl_core.data import load_dataset
from fl_core.synthetic import SyntheticRequest, content_hash, synthetic_set


def _request(tiny_root, tmp_path, cfg: SyntheticConfig) -> SyntheticRequest:
    ds = load_dataset("tiny", tiny_root, tmp_path / "cache")
    return SyntheticRequest(cfg, ds, ds.train.subset(torch.arange(0, 160, 2)), seed=0,
                            cache_dir=tmp_path / "cache", device=torch.device("cpu"))


def _assert_balanced(data, size, shape):
    assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (size, *shape)
    assert torch.bincount(data.labels, minlength=4).tolist() == [size // 4] * 4


def test_heldout_is_class_balanced_from_the_public_pool_and_cached(tiny_root, tmp_path):
    req = _request(tiny_root, tmp_path, SyntheticConfig(provider="heldout", size=20))
    data, manifest = synthetic_set(req)
    _assert_balanced(data, 20, (3, 16, 16))
    public = {tuple(img.flatten().tolist()) for img in req.public.images}
    assert all(tuple(img.flatten().tolist()) in public for img in data.images)
    assert manifest["provider"] == "heldout" and manifest["content_sha256"] == content_hash(data)
    folders = list((tmp_path / "cache" / "synthetic").iterdir())
    assert len(folders) == 1 and json.loads((folders[0] / "manifest.json").read_text())["size"] == 20
    again, _ = synthetic_set(req)
    assert torch.equal(again.images, data.images)
    with pytest.raises(ValueError, match="public samples"):
        synthetic_set(_request(tiny_root, tmp_path, SyntheticConfig(provider="heldout", size=200)))


def test_ddpm_is_trained_by_the_suite_then_sampled(tiny_root, tmp_path):
    from fl_core.synthetic import train_ddpm

    cfg = SyntheticConfig(provider="ddpm", size=8, ddpm=DDPMConfig(base_channels=8, train_steps=4, train_batch=8,
                                                                   sample_steps=2, sample_batch=4))
    req = _request(tiny_root, tmp_path, cfg)
    with pytest.raises(FileNotFoundError, match="train-ddpm"):
        synthetic_set(req)
    folder = train_ddpm(req, accelerator="cpu")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    data, manifest = synthetic_set(req)
    _assert_balanced(data, 8, (3, 16, 16))
    assert manifest["provider"] == "ddpm"
    assert data.images.float().std() > 1  # real samples, not a constant image


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (CLIP, GPT-2) uses for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tiny_text_to_image_pipeline(folder):
    """A randomly initialised Stable-Diffusion-shaped pipeline built from config and saved locally."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    chars = _byte_level_alphabet()
    vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    (folder / "tok").mkdir(parents=True)
    (folder / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                              model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_hidden_layers=1, projection_dim=16, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def test_diffusers_pipeline_from_a_local_folder(tiny_root, tmp_path):
    path = _tiny_text_to_image_pipeline(tmp_path / "sd")
    cfg = SyntheticConfig(provider="diffusers", size=4, diffusers=DiffusersConfig(
        pipeline=str(path), steps=2, guidance_scale=1.0, batch_size=2, class_prompts={"cross": "an X shape"}))
    data, manifest = synthetic_set(_request(tiny_root, tmp_path, cfg))
    _assert_balanced(data, 4, (3, 16, 16))  # 8x8 pipeline output resized to the dataset's 16x16
    assert manifest["settings"]["diffusers"]["class_prompts"] == {"cross": "an X shape"}


def test_class_prompts_use_the_template_and_overrides():
    from fl_core.synthetic import class_prompts

    cfg = SyntheticConfig(diffusers=DiffusersConfig(prompt_template="a photo of a {label}",
                                                    class_prompts={"cat": "a small cat"}))
    assert class_prompts(cfg, ["cat", "sea_lion"]) == ["a small cat", "a photo of a sea lion"]


def test_train_ddpm_command(tiny_root, tmp_path, capsys):
    from fl_core.synthetic import main

    sets = ["data.dataset=tiny", "data.public_size=40", "synthetic.provider=ddpm", "synthetic.size=4",
            "synthetic.ddpm.base_channels=8", "synthetic.ddpm.train_steps=2", "synthetic.ddpm.train_batch=8",
            f"synthetic.ddpm.weights={tmp_path / 'ddpm'}", f"runtime.cache_dir={tmp_path / 'cache'}",
            "fl.setting=custom", "fl.num_clients=3", "fl.clients_per_round=3", "data.min_samples=2"]
    main(["train-ddpm", "--data-root", str(tiny_root), *[f"--set={s}" for s in sets]])
    assert (tmp_path / "ddpm" / "unet" / "config.json").is_file()
    assert "DDPM saved to" in capsys.readouterr().out
