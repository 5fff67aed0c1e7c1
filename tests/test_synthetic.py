import json

import pytest
import torch

from fl_core.data import load_dataset
from fl_core.schema import DDPMConfig, DiffusersConfig, SyntheticConfig
from fl_core.synthetic import SyntheticRequest, content_hash, synthetic_set


def _request(tiny_root, tmp_path, cfg: SyntheticConfig) -> SyntheticRequest:
    ds = load_dataset("tiny", tiny_root, tmp_path / "cache")
    return SyntheticRequest(cfg, ds.info(), ds.train.subset(torch.arange(0, 160, 2)), seed=0,
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


TINY_DDPM = dict(base_channels=8, train_steps=4, train_batch=8, sample_steps=2, sample_batch=4)


def test_ddpm_is_trained_by_the_suite_then_sampled(tiny_root, tmp_path):
    from fl_core.synthetic import train_ddpm

    cfg = SyntheticConfig(provider="ddpm", size=8, ddpm=DDPMConfig(**TINY_DDPM))
    req = _request(tiny_root, tmp_path, cfg)
    with pytest.raises(FileNotFoundError, match="train-ddpm"):
        synthetic_set(req)
    folder = train_ddpm(req, accelerator="cpu")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["steps"] == 4 and manifest["weights"] == "EMA" and manifest["public_sha256"] == content_hash(req.public)
    data, manifest = synthetic_set(req)
    _assert_balanced(data, 8, (3, 16, 16))
    assert manifest["provider"] == "ddpm"
    assert data.images.float().std() > 1  # real samples, not a constant image
    guided, _ = synthetic_set(_request(tiny_root, tmp_path, SyntheticConfig(
        provider="ddpm", size=8, ddpm=DDPMConfig(**TINY_DDPM, guidance_scale=2.0))))
    _assert_balanced(guided, 8, (3, 16, 16))  # same FM (guidance is a sampling setting), other samples
    assert not torch.equal(guided.images, data.images)


def test_ddpm_weights_are_the_ema_and_serve_every_cell_seed(tiny_root, tmp_path):
    from fl_core.synthetic import ddpm_folder, load_ddpm, train_ddpm

    def trained(cache, **settings):
        req = _request(tiny_root, tmp_path / cache, SyntheticConfig(provider="ddpm", ddpm=DDPMConfig(**{**TINY_DDPM, **settings})))
        train_ddpm(req, accelerator="cpu")
        return req, load_ddpm(req)[0].state_dict()

    req, ema = trained("a", ema_decay=0.5)
    _, again = trained("b", ema_decay=0.5)
    _, raw = trained("c", ema_decay=0.0)
    assert all(torch.equal(ema[k], again[k]) for k in ema)  # seeded: the same FM twice
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the saved weights are the average
    other_seed = SyntheticRequest(req.cfg, req.dataset, req.public, seed=7, cache_dir=req.cache_dir, device=req.device)
    assert ddpm_folder(other_seed) == ddpm_folder(req)  # the cell seed draws samples, not another FM


def test_diffusers_pipeline_from_a_local_folder(tiny_root, tiny_pipeline, tmp_path):
    cfg = SyntheticConfig(provider="diffusers", size=4, diffusers=DiffusersConfig(
        pipeline=str(tiny_pipeline), steps=2, guidance_scale=1.0, batch_size=2, class_prompts={"cross": "an X shape"}))
    data, manifest = synthetic_set(_request(tiny_root, tmp_path, cfg))
    _assert_balanced(data, 4, (3, 16, 16))  # 8x8 pipeline output resized to the dataset's 16x16
    assert manifest["settings"]["diffusers"]["class_prompts"] == {"cross": "an X shape"}


def test_class_prompts_use_the_template_and_overrides():
    from fl_core.synthetic import class_prompts

    cfg = SyntheticConfig(diffusers=DiffusersConfig(prompt_template="a photo of a {label}",
                                                    class_prompts={"cat": "a small cat"}))
    assert class_prompts(cfg, ["cat", "sea_lion"]) == ["a small cat", "a photo of a sea lion"]


def test_train_ddpm_command(tiny_root, tmp_path, capsys):
    from benchmarks.fm import main

    sets = ["data.dataset=tiny", "data.public_size=40", "synthetic.provider=ddpm", "synthetic.size=4",
            "synthetic.ddpm.base_channels=8", "synthetic.ddpm.train_steps=2", "synthetic.ddpm.train_batch=8",
            f"synthetic.ddpm.weights={tmp_path / 'ddpm'}", f"runtime.cache_dir={tmp_path / 'cache'}",
            "fl.setting=custom", "fl.num_clients=3", "fl.clients_per_round=3", "data.min_samples=2"]
    main(["train-ddpm", "--data-root", str(tiny_root), *[f"--set={s}" for s in sets]])
    assert (tmp_path / "ddpm" / "unet" / "config.json").is_file()
    assert "DDPM saved to" in capsys.readouterr().out


def test_an_fm_is_trained_once_on_the_public_pool_of_its_own_seed(tiny_config, monkeypatch):
    import fl_core.synthetic as synthetic
    from benchmarks.fm import train_fm
    from fl_core.fl import prepare

    cfg = tiny_config({"seed": 3, "synthetic": {"provider": "ddpm", "size": 4, "ddpm": TINY_DDPM}})
    folder = train_fm(cfg, accelerator="cpu")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["public_sha256"] == content_hash(prepare(tiny_config({"seed": 0})).public)  # not seed 3's pool
    assert manifest["public_sha256"] != content_hash(prepare(cfg).public)
    monkeypatch.setattr(synthetic, "train_ddpm", lambda *a, **k: pytest.fail("trained twice"))
    assert train_fm(tiny_config({"seed": 1, "synthetic": {"provider": "ddpm", "ddpm": TINY_DDPM}})) == folder
