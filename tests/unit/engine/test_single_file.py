"""Single-file checkpoints (SDXL_BASE_MODEL / SDXL_REFINER_MODEL) and VAE files (SDXL_VAE).

The tiny pair, written in the original layout by the tests' own conversion
(tests/single_files.py), loads through diffusers' from_single_file with the tiny configs and
renders the pixels of the folder load; files that are no SDXL checkpoint are refused at load,
naming the variable and what the file is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_service.choices import RefinerMode
from sdxl_service.engine import Engine
from sdxl_service.engine.checkpoint_layout import (
    CLIP_L,
    CheckpointError,
    read_checkpoint_layout,
    sdxl_architecture,
    signature,
    vae_signature,
)
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.render_batch import ImageTask, RenderBatch
from tests.jobs import make_params
from tests.single_files import (
    clip_to_original,
    open_clip_to_original,
    save_checkpoint,
    unet_to_original,
    vae_to_original,
    write_single_files,
)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def single_files(
    tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]
) -> tuple[Path, Path]:
    return write_single_files(*tiny_pair, tmp_path_factory.mktemp("single-files"))


def engine_of(tiny_settings_factory, base: Path | str, refiner: Path | str, **more) -> Engine:
    settings = tiny_settings_factory(
        preset="sdxl", base_model=str(base), refiner_model=str(refiner), **more
    )
    return Engine.load(EngineConfig.of(settings))


def realigned(engine: Engine) -> Engine:
    """The engine with every weight copied into memory of its own.

    Loaded weights stay memory-mapped at their offset in the file, and the CPU kernels round
    differently at different alignments: the tiny pair from its folders and from single files,
    bit-identical weights, differed by one level in one pixel channel of a batch of two with a
    negative prompt (the folders against themselves, realigned, differ the same way). Equal
    weights at equal alignment render equal pixels, which is what these tests compare.
    """
    with torch.no_grad():
        for pipeline in (engine.base, engine.refiner):
            for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
                module = getattr(pipeline, name)
                for parameter in [] if module is None else module.parameters():
                    parameter.data = parameter.data.clone()
    return engine


@pytest.fixture(scope="module")
def file_engine(tiny_settings_factory, single_files: tuple[Path, Path]) -> Engine:
    return realigned(engine_of(tiny_settings_factory, *single_files))


@pytest.fixture(scope="module")
def folder_engine(tiny_settings_factory, tiny_pair: tuple[Path, Path]) -> Engine:
    return realigned(engine_of(tiny_settings_factory, *tiny_pair))


def test_the_checkpoints_are_in_the_original_layout(single_files: tuple[Path, Path]) -> None:
    base, refiner = (set(load_file(path)) for path in single_files)
    for prefix in (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.transformer.resblocks.",
    ):
        assert any(key.startswith(prefix) for key in base), prefix
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in base
    assert "conditioner.embedders.0.model.text_projection" in refiner
    assert not any(key.startswith("conditioner.embedders.1.") for key in refiner)


@pytest.mark.parametrize("mode", list(RefinerMode))
def test_single_files_render_the_pixels_of_the_folders(
    file_engine: Engine, folder_engine: Engine, mode: RefinerMode
) -> None:
    batch = RenderBatch(
        params=make_params(refiner=mode),
        tasks=[ImageTask(prompt="a red fox", negative_prompt="blurry", seed=7 + i) for i in (0, 1)],
    )
    ours, theirs = file_engine.render(batch), folder_engine.render(batch)
    for image, expected in zip(ours, theirs, strict=True):
        assert np.array_equal(pixels(image), pixels(expected))
    assert np.abs(pixels(ours[0]) - pixels(ours[1])).mean() > 1  # the seeds do differ


def test_single_files_load_every_weight_of_the_folders(
    file_engine: Engine, folder_engine: Engine
) -> None:
    pairs = [(file_engine.base, folder_engine.base), (file_engine.refiner, folder_engine.refiner)]
    for ours, theirs in pairs:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(theirs, name) is None:
                assert getattr(ours, name) is None
                continue
            mine, expected = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
            assert mine.keys() == expected.keys(), name
            assert all(torch.equal(mine[key], expected[key]) for key in expected), name
    for ours, theirs in pairs:
        assert {**ours.config, "_name_or_path": None} == {**theirs.config, "_name_or_path": None}


def test_the_refiner_of_single_files_shares_the_bases_text_encoder_and_vae(
    file_engine: Engine,
) -> None:
    assert file_engine.refiner.text_encoder_2 is file_engine.base.text_encoder_2
    assert file_engine.refiner.vae is file_engine.base.vae
    assert file_engine.base.unet.dtype == torch.float32
    assert file_engine.describe()["base"].endswith("base.safetensors")


def test_single_files_load_in_the_dtype_asked(
    tiny_settings_factory, single_files: tuple[Path, Path]
) -> None:
    engine = engine_of(tiny_settings_factory, *single_files, dtype="bfloat16")
    for module in (engine.base.unet, engine.refiner.unet, engine.base.text_encoder_2):
        assert module.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_module_is_read_in_the_dtype_asked_never_whole_in_another(
    single_files: tuple[Path, Path],
    tiny_cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    dtype: torch.dtype,
) -> None:
    """diffusers is given the dtype and casts each tensor as it reads it: no module of a file
    (float32 here) is built in its own dtype, or diffusers' float32, and cast after (two
    copies side by side: issue 25's start-up peak); the loader's own cast has nothing left."""
    from sdxl_service.engine import single_file
    from sdxl_service.engine.loading import load_base_pipeline, load_vae

    seen: list[set[torch.dtype]] = []
    cast = single_file.cast_module

    def spy(module: torch.nn.Module, to: torch.dtype) -> torch.nn.Module:
        seen.append({p.dtype for p in module.parameters()})
        return cast(module, to)

    monkeypatch.setattr(single_file, "cast_module", spy)
    cache = tiny_cache_dir
    with caplog.at_level("WARNING"):
        base = load_base_pipeline(str(single_files[0]), dtype=dtype, variant=None, cache_dir=cache)
        vae_file = save_checkpoint(
            vae_to_original(base.vae.state_dict(), dict(base.vae.config)),
            tmp_path / "vae.safetensors",
        )
        load_vae(str(vae_file), dtype=dtype, variant=None, cache_dir=cache)
    # unet, vae, text_encoder and text_encoder_2 of the base, then the VAE file.
    assert seen == [{dtype}] * 5
    # diffusers' warning of float32 modules on its no-op cast of a model that keeps none.
    assert "kept in float32" not in caplog.text


def test_the_layout_is_read_from_the_tensors_not_the_name(
    single_files: tuple[Path, Path], tmp_path: Path
) -> None:
    # A refiner saved under a base's name is still a refiner.
    misnamed = tmp_path / "sd_xl_base_1.0.safetensors"
    misnamed.write_bytes(single_files[1].read_bytes())
    layout = read_checkpoint_layout(single_files[0], "SDXL_BASE_MODEL", kind="base")
    assert (layout.kind, layout.architecture, layout.has_vae) == ("base", "tiny", True)
    with pytest.raises(CheckpointError, match=r"SDXL_BASE_MODEL=.+is an SDXL refiner checkpoint"):
        read_checkpoint_layout(misnamed, "SDXL_BASE_MODEL", kind="base")


def test_a_half_precision_file_with_the_extras_real_checkpoints_carry_loads(
    tiny_settings_factory, single_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Civitai files are fp16 and carry tensors diffusers does not load (CLIP's position ids,
    OpenCLIP's logit scale, the SGM trainer's sigmas): they load in the dtype asked."""
    tensors = {key: value.half() for key, value in load_file(single_files[0]).items()}
    tensors[f"{CLIP_L}text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    tensors["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    tensors["denoiser.sigmas"] = torch.rand(1000)
    path = save_checkpoint(tensors, tmp_path / "civitai.safetensors")
    engine = engine_of(tiny_settings_factory, path, single_files[1])
    for module in (engine.base.unet, engine.base.text_encoder, engine.base.text_encoder_2):
        assert module.dtype == torch.float32
    expected = {key: value.half().float() for key, value in load_file(single_files[0]).items()}
    ours = engine.base.unet.state_dict()
    assert torch.equal(
        ours["conv_in.weight"], expected["model.diffusion_model.input_blocks.0.0.weight"]
    )
    batch = RenderBatch(params=make_params(), tasks=[ImageTask(prompt="a red fox", seed=3)])
    assert engine.render(batch)[0].size == (64, 64)


# --- files that are no SDXL checkpoint ------------------------------------------------------


def zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


SD15_CHECKPOINT = {
    "model.diffusion_model.input_blocks.0.0.weight": zeros(320, 4, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": zeros(77, 8),
    "first_stage_model.encoder.conv_in.weight": zeros(128, 3, 3, 3),
}
KOHYA_LORA = {
    "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": zeros(4, 16),
    "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": zeros(16, 4),
}


@pytest.mark.parametrize(
    ("tensors", "found"),
    [
        (SD15_CHECKPOINT, "is not an SDXL checkpoint: it is a Stable Diffusion 1.x/2.x checkpoint"),
        (KOHYA_LORA, "is not an SDXL checkpoint: it is a LoRA"),
        (
            {"encoder.conv_in.weight": zeros(8), "decoder.conv_in.weight": zeros(8)},
            "is not an SDXL checkpoint: it is a VAE alone",
        ),
    ],
    ids=["sd15", "lora", "vae"],
)
def test_a_file_that_is_no_sdxl_checkpoint_fails_naming_the_variable_and_what_it_is(
    tiny_settings_factory,
    single_files: tuple[Path, Path],
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    found: str,
) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=rf"^SDXL_BASE_MODEL='{path}' {found}"):
        engine_of(tiny_settings_factory, path, single_files[1])
    with pytest.raises(CheckpointError, match=rf"^SDXL_REFINER_MODEL='{path}' {found}"):
        engine_of(tiny_settings_factory, single_files[0], path)


def test_a_truncated_checkpoint_fails_at_load(
    tiny_settings_factory, single_files: tuple[Path, Path], tmp_path: Path
) -> None:
    whole = single_files[0].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"SDXL_BASE_MODEL=.+not a readable safetensors"):
        engine_of(tiny_settings_factory, path, single_files[1])


def test_a_base_given_as_the_refiner_is_refused_with_the_right_variable(
    tiny_settings_factory, single_files: tuple[Path, Path]
) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"SDXL_REFINER_MODEL=.+is an SDXL base checkpoint.+give it as SDXL_BASE_MODEL",
    ):
        engine_of(tiny_settings_factory, single_files[0], single_files[0])


@pytest.mark.parametrize(
    ("removed", "message"),
    [
        # accelerate's dispatch trips over a UNet weight left on the meta device.
        ("model.diffusion_model.middle_block.1.proj_out.weight", "lacks weights of its UNet"),
        # The text encoders are not moved by diffusers: what they lack is named.
        (
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias",
            r"lacks 1 tensors of its text_encoder \(the first: final_layer_norm.bias\)",
        ),
    ],
    ids=["unet", "text_encoder"],
)
def test_a_checkpoint_missing_tensors_is_refused(
    tiny_settings_factory,
    single_files: tuple[Path, Path],
    tmp_path: Path,
    removed: str,
    message: str,
) -> None:
    tensors = load_file(single_files[0])
    del tensors[removed]
    path = save_checkpoint(tensors, tmp_path / "pruned.safetensors")
    with pytest.raises(
        CheckpointError, match=rf"SDXL_BASE_MODEL=.+{message}.*an incomplete or pruned checkpoint"
    ):
        engine_of(tiny_settings_factory, path, single_files[1])


def test_a_checkpoint_of_another_architecture_is_refused(
    tiny_settings_factory, single_files: tuple[Path, Path], tmp_path: Path
) -> None:
    tensors = load_file(single_files[0])
    tensors["model.diffusion_model.label_emb.0.0.weight"] = zeros(64, 99)
    path = save_checkpoint(tensors, tmp_path / "other.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"SDXL_BASE_MODEL=.+another architecture than SDXL base 1.0's \(nearest: the tiny "
        r"configs\): model.diffusion_model.label_emb.0.0.weight is \[64, 99\], expected \[64, 80\]",
    ):
        engine_of(tiny_settings_factory, path, single_files[1])


# --- SDXL_VAE as one file ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny-layout VAE of other weights: as a folder, and as one file in either layout."""
    from diffusers import AutoencoderKL

    from sdxl_service.engine.tiny import vae_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        vae = AutoencoderKL.from_config(vae_config())
    root = tmp_path_factory.mktemp("other-vae")
    vae.save_pretrained(root / "folder")
    state = vae.state_dict()
    return {
        "folder": root / "folder",
        "diffusers": save_checkpoint(state, root / "diffusion_pytorch_model.safetensors"),
        "original": save_checkpoint(
            vae_to_original(state, dict(vae.config)), root / "civitai-vae.safetensors"
        ),
    }


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_a_vae_file_replaces_the_vae_of_base_and_refiner_as_its_folder_does(
    tiny_settings_factory, tiny_engine: Engine, other_vae: dict[str, Path], layout: str
) -> None:
    from_file = Engine.load(EngineConfig.of(tiny_settings_factory(vae=str(other_vae[layout]))))
    from_folder = Engine.load(EngineConfig.of(tiny_settings_factory(vae=str(other_vae["folder"]))))
    assert from_file.base.vae is from_file.refiner.vae is from_file.latent_codec.vae
    batch = RenderBatch(params=make_params(), tasks=[ImageTask(prompt="a red fox", seed=3)])
    image = pixels(from_file.render(batch)[0])
    assert np.array_equal(image, pixels(from_folder.render(batch)[0]))
    assert np.abs(image - pixels(tiny_engine.render(batch)[0])).mean() > 1


def test_a_vae_file_with_single_file_checkpoints(
    tiny_settings_factory, single_files: tuple[Path, Path], other_vae: dict[str, Path]
) -> None:
    engine = engine_of(tiny_settings_factory, *single_files, vae=str(other_vae["original"]))
    folder = Engine.load(EngineConfig.of(tiny_settings_factory(vae=str(other_vae["folder"]))))
    assert engine.base.vae is engine.refiner.vae
    batch = RenderBatch(params=make_params(), tasks=[ImageTask(prompt="a red fox", seed=5)])
    assert np.array_equal(pixels(engine.render(batch)[0]), pixels(folder.render(batch)[0]))


@pytest.mark.parametrize(
    ("tensors", "found"),
    [
        (KOHYA_LORA, "it is a LoRA"),
        (SD15_CHECKPOINT, "it is a whole checkpoint"),
        (
            {"encoder.conv_in.weight": zeros(96, 3, 3, 3), "decoder.conv_in.weight": zeros(1)},
            "another architecture than SDXL's .+: encoder.conv_in.weight is \\[96, 3, 3, 3\\]",
        ),
    ],
    ids=["lora", "checkpoint", "other-vae"],
)
def test_a_vae_file_that_is_no_sdxl_vae_fails_naming_the_variable(
    tiny_settings_factory, tmp_path: Path, tensors: dict[str, torch.Tensor], found: str
) -> None:
    path = tmp_path / "vae.safetensors"
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=rf"^SDXL_VAE='{path}' .*{found}"):
        Engine.load(EngineConfig.of(tiny_settings_factory(vae=str(path))))


# --- the packaged SDXL 1.0 configs -------------------------------------------------------------


def test_the_packaged_folders_load_offline_as_diffusers_and_transformers_read_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig

    from sdxl_service.engine.checkpoint_layout import SDXL_CONFIGS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, refiner = str(SDXL_CONFIGS / "base"), str(SDXL_CONFIGS / "refiner")
    assert StableDiffusionXLPipeline.load_config(base)["force_zeros_for_empty_prompt"] is True
    refiner_index = StableDiffusionXLImg2ImgPipeline.load_config(refiner)
    assert refiner_index["requires_aesthetics_score"] is True
    assert refiner_index["text_encoder"] == [None, None]
    for folder in (base, refiner):
        scheduler = EulerDiscreteScheduler.from_pretrained(
            folder, subfolder="scheduler", local_files_only=True
        )
        assert scheduler.config.timestep_spacing == "leading"
        assert AutoencoderKL.load_config(folder, subfolder="vae")["scaling_factor"] == 0.13025
        big_g = CLIPTextConfig.from_pretrained(
            folder, subfolder="text_encoder_2", local_files_only=True
        )
        assert (big_g.hidden_size, big_g.num_hidden_layers, big_g.hidden_act) == (1280, 32, "gelu")
    clip_l = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder", local_files_only=True)
    assert (clip_l.hidden_size, clip_l.hidden_act) == (768, "quick_gelu")
    unets = [UNet2DConditionModel.load_config(f, subfolder="unet") for f in (base, refiner)]
    assert [u["cross_attention_dim"] for u in unets] == [2048, 1280]


def full_size_original_layout(kind: str) -> dict[str, torch.Tensor]:
    """SDXL 1.0's base or refiner built from the packaged configs on the meta device (no
    memory), in the original layout by the tests' conversion."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    architecture = sdxl_architecture()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(architecture.unet[kind])
        vae = AutoencoderKL.from_config(architecture.vae)
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**architecture.text_encoder_2))
        tensors = unet_to_original(unet.state_dict(), architecture.unet[kind])
        tensors |= vae_to_original(vae.state_dict(), architecture.vae, "first_stage_model.")
        if kind == "base":
            clip_l = CLIPTextModel(CLIPTextConfig(**architecture.text_encoder))
            tensors |= clip_to_original(clip_l.state_dict())
            tensors |= open_clip_to_original(big_g.state_dict(), "conditioner.embedders.1.model.")
        else:
            tensors |= open_clip_to_original(big_g.state_dict(), "conditioner.embedders.0.model.")
    return tensors


# Shapes of tensors in stabilityai's sd_xl_base_1.0.safetensors / sd_xl_refiner_1.0.safetensors.
PUBLISHED = {
    "base": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (
            1280,
            2048,
        ),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        f"{CLIP_L}text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    },
    "refiner": {
        "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "conditioner.embedders.0.model.positional_embedding": (77, 1280),
        "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
    },
}


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_the_packaged_configs_describe_the_published_checkpoints(kind: str) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    architecture = sdxl_architecture()
    tensors = full_size_original_layout(kind)  # type: ignore[arg-type]
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    for key, shape in PUBLISHED[kind].items():
        assert shapes.get(key) == shape, key
    expected = signature(architecture, kind) | vae_signature(architecture.vae, "first_stage_model.")
    assert {key: shapes.get(key) for key in expected} == expected
    # diffusers' own conversion maps the layout back onto every tensor of the configs' UNet.
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(architecture.unet[kind])
        vae = AutoencoderKL.from_config(architecture.vae)
    converted = convert_ldm_unet_checkpoint(tensors, architecture.unet[kind])
    assert set(converted) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(tensors, architecture.vae)) == set(vae.state_dict())
