"""maskkit.adapters.models: the --model spec grammar and the one factory over timm, official MAE and HF."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from maskkit import is_mae
from maskkit.adapters.models import (
    HF_TINY,
    ModelSpec,
    create_mae_from_spec,
    load_official_module,
    parse_model_options,
    parse_model_spec,
)
from maskkit.adapters.official_mae import OfficialMAE, timm_compat
from maskkit.adapters.timm import TimmMAE, create_mae

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODELS_MAE = EXAMPLES / "models_mae.py"
TINY_CLASS_OPTIONS = dict(  # MaskedAutoencoderViT's defaults are ViT-L: shrink it to the double's tiny size
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
    mlp_ratio=2.0,
)


def _load_reference():
    spec = importlib.util.spec_from_file_location("maskkit_test_models_models_mae", MODELS_MAE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture()
def images():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


# ---- grammar ----------------------------------------------------------------------------------


def test_parse_all_forms(tmp_path, monkeypatch):
    assert parse_model_spec("micro") == ModelSpec("timm", "micro")
    assert parse_model_spec(" timm:pilot ") == ModelSpec("timm", "pilot") == parse_model_spec("pilot")
    assert parse_model_spec("hf:tiny") == ModelSpec("hf", "tiny")
    monkeypatch.chdir(tmp_path)
    assert parse_model_spec("hf:cfg/config.json") == ModelSpec("hf", str(tmp_path / "cfg" / "config.json"))
    spec = parse_model_spec("official:models_mae.py")
    assert spec == ModelSpec("official", str(tmp_path / "models_mae.py"), "MaskedAutoencoderViT")
    assert Path(spec.target).is_absolute()
    spec = parse_model_spec("official:/x/y/models_mae.py:mae_vit_base_patch16")
    assert (spec.target, spec.callable) == ("/x/y/models_mae.py", "mae_vit_base_patch16")
    for text in ("micro", "hf:tiny", "hf:/a/config.json", "official:/a/models_mae.py:Foo"):
        assert parse_model_spec(str(parse_model_spec(text))) == parse_model_spec(text)
    assert str(parse_model_spec("timm:tiny")) == "tiny" and str(spec).endswith(":mae_vit_base_patch16")
    assert (
        parse_model_spec("micro").requires_patch_size and not parse_model_spec("hf:tiny").requires_patch_size
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "model spec must be"),
        ("nope", "unknown MAE preset 'nope'"),
        ("timm:nope", "unknown MAE preset 'nope'"),
        ("foo:bar", "unknown model kind 'foo'"),
        ("official:", "names no official model"),
        ("hf:", "names no hf model"),
        ("official:/a/models.txt", "Python file"),
        ("official:/a/models_mae.py:1bad", "Python file"),
        ("hf:/a/config.yaml", ".json"),
    ],
)
def test_parse_rejects_bad_specs(text, match):
    with pytest.raises(ValueError, match=match) as exc:
        parse_model_spec(text)
    _one_line_error(exc)


def test_parse_model_options():
    pairs = ["a=64", "b=0.5", "c=true", 'd="x"', "e=hello", "f=", "g=[1, 2]", "h=a=b", "a=65"]
    assert parse_model_options(pairs) == {
        "a": 65,
        "b": 0.5,
        "c": True,
        "d": "x",
        "e": "hello",
        "f": "",
        "g": [1, 2],
        "h": "a=b",
    }
    assert parse_model_options([]) == {}
    for bad, match in (("depth", "must be key=value"), ("=3", "not a valid option name"), ("a-b=1", "a-b")):
        with pytest.raises(ValueError, match=match) as exc:
            parse_model_options([bad])
        _one_line_error(exc)


# ---- timm presets -----------------------------------------------------------------------------


def test_timm_preset_equals_create_mae():
    mae = create_mae_from_spec(
        "micro", img_size=8, in_chans=1, patch_size=2, seed=3, options={"decoder_depth": 2}
    )
    ref = create_mae("micro", img_size=8, patch_size=2, in_chans=1, seed=3, decoder_depth=2)
    assert isinstance(mae, TimmMAE) and is_mae(mae) and _same_state(mae, ref)
    assert (mae.num_patches, mae.embed_dim, mae.patch_size, len(mae.decoder_blocks)) == (16, 64, 2, 2)
    other = create_mae_from_spec("timm:micro", img_size=8, in_chans=1, patch_size=2, seed=4)
    assert not torch.equal(other.decoder_pred.weight, ref.decoder_pred.weight)


def test_timm_errors():
    with pytest.raises(ValueError, match="needs an explicit patch_size") as exc:
        create_mae_from_spec("micro", img_size=8, in_chans=1)
    _one_line_error(exc)
    with pytest.raises(ValueError, match="'img_size' is set by the run") as exc:
        create_mae_from_spec("micro", img_size=8, in_chans=1, patch_size=2, options={"img_size": 16})
    _one_line_error(exc)
    with pytest.raises(ValueError, match="decoder_depth") as exc:
        create_mae_from_spec("micro", img_size=8, in_chans=1, patch_size=2, options={"decoder_depth": 0})
    _one_line_error(exc)
    with pytest.raises(ValueError, match="not divisible by patch_size 3"):
        create_mae_from_spec("micro", img_size=8, in_chans=1, patch_size=3)


# ---- official models_mae.py -------------------------------------------------------------------


def _official_reference(fn_name: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    with timm_compat(reference):
        return getattr(reference, fn_name)(**kwargs)


def test_official_class_callable_same_weights():
    spec = f"official:{MODELS_MAE}:MaskedAutoencoderViT"
    mae = create_mae_from_spec(
        spec, img_size=16, in_chans=3, patch_size=4, seed=5, options=TINY_CLASS_OPTIONS
    )
    ref = _official_reference(
        "MaskedAutoencoderViT",
        5,
        img_size=16,
        in_chans=3,
        patch_size=4,
        norm_pix_loss=False,
        **TINY_CLASS_OPTIONS,
    )
    assert isinstance(mae, OfficialMAE) and is_mae(mae) and _same_state(mae.model, ref)
    assert (mae.num_patches, mae.embed_dim, mae.patch_size, mae.in_chans) == (16, 32, 4, 3)
    # the class names patch_size: a given one is passed
    small = create_mae_from_spec(spec, img_size=16, in_chans=1, patch_size=2, options=TINY_CLASS_OPTIONS)
    assert (small.patch_size, small.num_patches, small.in_chans) == (2, 64, 1)


def test_official_factory_callable_same_weights_and_patch_rule():
    spec = f"official:{MODELS_MAE}:mae_vit_tiny_patch4"
    mae = create_mae_from_spec(spec, img_size=16, in_chans=3, seed=5, norm_pix_loss=True)
    ref = _official_reference("mae_vit_tiny_patch4", 5, img_size=16, in_chans=3, norm_pix_loss=True)
    assert _same_state(mae.model, ref) and mae.norm_pix_loss is True
    assert (mae.num_patches, mae.embed_dim, mae.patch_size) == (16, 32, 4)
    # a factory that takes only **kwargs keeps its own patch size: a matching one is fine, another is refused
    same = create_mae_from_spec(spec, img_size=16, in_chans=3, patch_size=4, seed=5, norm_pix_loss=True)
    assert _same_state(same, mae)
    with pytest.raises(ValueError, match="builds patch size 4, not the requested 2") as exc:
        create_mae_from_spec(spec, img_size=16, in_chans=3, patch_size=2)
    _one_line_error(exc)
    # options reach the factory; the global RNG is left alone
    state = torch.random.get_rng_state()
    wide = create_mae_from_spec(spec, img_size=8, in_chans=1, options={"embed_dim": 16, "decoder_depth": 2})
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (wide.embed_dim, wide.num_patches, wide.in_chans, len(wide.model.decoder_blocks)) == (16, 4, 1, 2)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_official_wrapped_loss_equals_own_forward(images, norm_pix_loss, one_thread):
    mae = create_mae_from_spec(
        f"official:{MODELS_MAE}:mae_vit_tiny_patch4", img_size=16, in_chans=3, norm_pix_loss=norm_pix_loss
    ).eval()
    torch.manual_seed(11)
    loss, pred, mask = mae.model(images, mask_ratio=0.6)  # the official forward, its own random masking
    torch.manual_seed(11)
    out = mae(images, ratio=0.6)  # the protocol: random policy, the same torch.rand noise
    assert torch.equal(out.loss, loss) and torch.equal(out.pred, pred) and torch.equal(out.plan.mask, mask)


def test_official_relative_path_and_module_cache(monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    spec = parse_model_spec("official:examples/models_mae.py:mae_vit_tiny_patch4")
    assert spec.target == str(MODELS_MAE)
    module = load_official_module("examples/models_mae.py")
    assert module is load_official_module(MODELS_MAE) and sys.modules[module.__name__] is module
    assert module is not reference and module.__name__.startswith("maskkit_official_models_mae_")
    mae = create_mae_from_spec(spec, img_size=16, in_chans=3)
    assert type(mae.model) is module.MaskedAutoencoderViT


def test_official_errors(tmp_path):
    with pytest.raises(ValueError, match="official model file not found") as exc:
        create_mae_from_spec(f"official:{tmp_path / 'missing.py'}", img_size=16, in_chans=3)
    _one_line_error(exc)

    with pytest.raises(ValueError, match="has no callable 'Foo'") as exc:
        create_mae_from_spec(f"official:{MODELS_MAE}:Foo", img_size=16, in_chans=3)
    message = _one_line_error(exc)
    assert (
        "mae_vit_tiny_patch4" in message and "MaskedAutoencoderViT" in message and "PatchEmbed" not in message
    )

    with pytest.raises(
        ValueError, match="has no option 'bogus'"
    ) as exc:  # the class: checked by its signature
        create_mae_from_spec(f"official:{MODELS_MAE}", img_size=16, in_chans=3, options={"bogus": 1})
    _one_line_error(exc)

    with pytest.raises(
        ValueError, match="rejected its arguments.*bogus"
    ) as exc:  # a **kwargs factory: its TypeError
        create_mae_from_spec(
            f"official:{MODELS_MAE}:mae_vit_tiny_patch4", img_size=16, in_chans=3, options={"bogus": 1}
        )
    _one_line_error(exc)

    with pytest.raises(ValueError, match="'patch_size' is set by the run"):
        create_mae_from_spec(
            f"official:{MODELS_MAE}:mae_vit_tiny_patch4", img_size=16, in_chans=3, options={"patch_size": 2}
        )

    broken = tmp_path / "broken_models.py"
    broken.write_text("import maskkit_no_such_module_xyz\n")
    with pytest.raises(ValueError, match="cannot import official model file.*ModuleNotFoundError") as exc:
        create_mae_from_spec(f"official:{broken}", img_size=16, in_chans=3)
    _one_line_error(exc)

    foreign = tmp_path / "foreign.py"
    foreign.write_text("import torch\n\ndef build(**kwargs):\n    return torch.nn.Linear(2, 2)\n")
    with pytest.raises(ValueError, match="lacks the official MAE interface") as exc:
        create_mae_from_spec(f"official:{foreign}:build", img_size=16, in_chans=3)
    _one_line_error(exc)

    named = tmp_path / "named.py"
    named.write_text("def small(img_size, in_chans):\n    raise AssertionError('never called')\n")
    with pytest.raises(ValueError, match="small in named.py cannot take 'norm_pix_loss'") as exc:
        create_mae_from_spec(f"official:{named}:small", img_size=16, in_chans=3)
    _one_line_error(exc)


# ---- Hugging Face -----------------------------------------------------------------------------


def test_hf_tiny_builds(images):
    pytest.importorskip("transformers")
    mae = create_mae_from_spec("hf:tiny", img_size=16, in_chans=3, seed=2)
    assert is_mae(mae) and (mae.num_patches, mae.patch_size, mae.embed_dim, mae.in_chans) == (16, 4, 64, 3)
    cfg = mae.config
    assert {k: getattr(cfg, k) for k in HF_TINY} == HF_TINY and cfg.image_size == 16
    assert _same_state(mae, create_mae_from_spec("hf:tiny", img_size=16, in_chans=3, seed=2))
    assert torch.isfinite(mae(images, ratio=0.75).loss)
    grey = create_mae_from_spec(
        "hf:tiny",
        img_size=16,
        in_chans=1,
        patch_size=2,
        norm_pix_loss=True,
        options={"hidden_size": 32, "num_attention_heads": 2},
    )
    assert (grey.num_patches, grey.in_chans, grey.embed_dim, grey.norm_pix_loss) == (64, 1, 32, True)


def test_hf_config_file_takes_sizes_from_arguments(tmp_path):
    tf = pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    tf.ViTMAEConfig(
        image_size=224,
        num_channels=3,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    ).to_json_file(str(path))
    mae = create_mae_from_spec(f"hf:{path}", img_size=16, in_chans=1, norm_pix_loss=True)
    assert (mae.num_patches, mae.patch_size, mae.in_chans, mae.embed_dim, mae.norm_pix_loss) == (
        16,
        4,
        1,
        32,
        True,
    )
    assert (mae.config.image_size, mae.config.num_channels) == (16, 1)
    assert torch.isfinite(mae(torch.rand(2, 1, 16, 16)).loss)
    coarse = create_mae_from_spec(
        f"hf:{path}", img_size=16, in_chans=1, patch_size=8, options={"mask_ratio": 0.5}
    )
    assert (coarse.num_patches, coarse.config.mask_ratio) == (4, 0.5)
    with pytest.raises(ValueError, match="unknown ViTMAEConfig option 'hiden_size'.*'hidden_size'") as exc:
        create_mae_from_spec(f"hf:{path}", img_size=16, in_chans=1, options={"hiden_size": 8})
    _one_line_error(exc)
    with pytest.raises(ValueError, match="hf model config not found"):
        create_mae_from_spec(f"hf:{tmp_path / 'none.json'}", img_size=16, in_chans=1)
    with pytest.raises(ValueError, match="square images"):
        create_mae_from_spec(f"hf:{path}", img_size=(16, 32), in_chans=1)
    with pytest.raises(ValueError, match="patch size 4 does not divide"):
        create_mae_from_spec("hf:tiny", img_size=18, in_chans=1)


def test_hf_missing_extra_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"maskkit\[hf\]"):
        create_mae_from_spec("hf:tiny", img_size=16, in_chans=3)
