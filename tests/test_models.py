"""Tests for adaptive_sched.models: a contract suite over the registry plus per-net checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptive_sched.errors import UsageError
from adaptive_sched.models import MODELS, MLPDenoiser, UNet, build_model, count_parameters, names
from adaptive_sched.models.unet import group_count

# A small configuration of every registered model: (data_shape, constructor kwargs).
SMALL = {
    "mlp": ((16,), dict(hidden=32, depth=2, emb_dim=32)),
    "unet": ((1, 8, 8), dict(channels=(8, 16), emb_dim=32, groups=8)),
}


def unzero(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised output layer random weights so the output depends on the input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.out.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def small(name: str, num_classes: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Seeded small model `name` and a matching input batch of 3 examples."""
    shape, kwargs = SMALL[name]
    torch.manual_seed(0)
    model = unzero(build_model(name, shape, num_classes=num_classes, **kwargs))
    return model, torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))


def test_every_model_has_a_small_config():
    assert set(SMALL) == set(MODELS)
    assert names() == [*MODELS, "auto"]


@pytest.mark.parametrize("name", list(MODELS))
def test_output_starts_at_zero(name):
    shape, kwargs = SMALL[name]
    model = build_model(name, shape, **kwargs)
    x = torch.randn(2, *shape)
    assert torch.equal(model(x, torch.zeros(2)), torch.zeros_like(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_output_depends_on_logsnr(name):
    model, x = small(name)
    a, b = model(x, torch.full((3,), -2.0)), model(x, torch.full((3,), 3.0))
    assert a.shape == x.shape
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_scalar_logsnr_broadcasts(name):
    model, x = small(name)
    torch.testing.assert_close(model(x, torch.tensor(1.5)), model(x, torch.full((3,), 1.5)))


@pytest.mark.parametrize("name", list(MODELS))
def test_class_conditioning(name):
    model, x = small(name, num_classes=4)
    lam = torch.zeros(3)
    null = torch.full((3,), 4, dtype=torch.long)
    torch.testing.assert_close(model(x, lam), model(x, lam, null))
    a, b = model(x, lam, torch.tensor([0, 1, 2])), model(x, lam, torch.tensor([3, 3, 3]))
    assert ((a - b).flatten(1).abs().amax(dim=1) > 1e-4).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_labels_without_classes_raise(name):
    model, x = small(name)
    with pytest.raises(UsageError, match="num_classes"):
        model(x, torch.zeros(3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("name", list(MODELS))
def test_finite_at_extreme_logsnr(name):
    model, x = small(name)
    inf = float("inf")
    for lam in (20.0, -20.0, 1e4, -1e4, inf, -inf):
        assert torch.isfinite(model(x, torch.full((3,), lam))).all(), lam
    # clamped to [-30, 30]: beyond it λ makes no difference
    torch.testing.assert_close(model(x, torch.full((3,), 30.0)), model(x, torch.full((3,), inf)))


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_reach_every_parameter(name):
    model, x = small(name, num_classes=4)
    model(x, torch.randn(3) * 5, torch.tensor([0, 1, 4])).square().sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


@pytest.mark.parametrize("dim", [2, 16])
def test_mlp_shapes(dim):
    model = unzero(MLPDenoiser(dim, hidden=32, depth=2, emb_dim=32))
    x = torch.randn(5, dim)
    assert model(x, torch.zeros(5)).shape == x.shape
    with pytest.raises(UsageError, match="expects x"):
        model(torch.randn(5, dim + 1), torch.zeros(5))


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((1, 8, 8), dict(channels=(8, 16, 16), emb_dim=32, groups=8)),
        ((1, 28, 28), dict(channels=(32, 64), emb_dim=32)),
        ((3, 32, 32), dict(channels=(16, 32, 32), emb_dim=32, attention_levels=(2,))),
        ((1, 64, 64), dict(channels=(8, 16, 16, 16), blocks_per_level=1, emb_dim=32, groups=8)),
        ((2, 16, 24), dict(channels=(8, 16), emb_dim=32, attention_levels=(0, 1))),
    ],
)
def test_unet_shapes(shape, kwargs):
    model = unzero(build_model("unet", shape, **kwargs))
    x = torch.randn(2, *shape)
    assert model(x, torch.zeros(2)).shape == x.shape


def test_unet_bad_size_raises():
    with pytest.raises(UsageError, match="--pad or --resize"):
        build_model("unet", (1, 30, 30))  # 30 → 15 → 7.5 with 3 levels
    build_model("unet", (1, 28, 28), channels=(8, 16, 16), groups=8)  # 28 → 14 → 7 is fine
    model = UNet(1, 8, channels=(8, 16), groups=8)
    with pytest.raises(UsageError, match="--pad or --resize"):
        model(torch.randn(1, 1, 9, 8), torch.zeros(1))


def test_unet_bad_attention_level_raises():
    with pytest.raises(UsageError, match="attention_levels"):
        UNet(1, 8, channels=(8, 16), attention_levels=(2,))


def test_group_count_divides_every_channel():
    assert group_count(32, (64, 128, 128)) == 32
    assert group_count(32, (24, 48)) == 24
    assert group_count(32, (20, 30)) == 10
    assert group_count(8, (7, 14)) == 7


def test_default_unet_parameter_count():
    # Defaults (64, 128, 128) x 2 blocks, emb 128, one middle block, mirrored up path: 4,623,361 parameters,
    # near the 4.16M reference net of the performance issue.
    assert count_parameters(build_model("auto", (1, 32, 32))) == 4_623_361


def test_unet_channels_last_and_bf16_autocast():
    model = unzero(UNet(3, 16, channels=(16, 32), emb_dim=32, attention_levels=(1,)))
    x = torch.randn(2, 3, 16, 16)
    ref = model(x, torch.ones(2))
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), torch.ones(2))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x.to(memory_format=torch.channels_last), torch.ones(2))
    assert low.shape == x.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2


def test_build_model_auto_and_errors():
    assert isinstance(build_model("auto", (2,), hidden=16, depth=1), MLPDenoiser)
    assert isinstance(build_model("auto", (1, 8, 8), channels=(8,), groups=8), UNet)
    with pytest.raises(UsageError, match="unknown model 'resnet'.*mlp, unet, auto"):
        build_model("resnet", (2,))
    with pytest.raises(UsageError, match="unknown option 'widht'.*hidden"):
        build_model("mlp", (2,), widht=3)
    with pytest.raises(UsageError, match="unknown option 'dim'"):
        build_model("mlp", (2,), dim=3)  # taken from data_shape
    with pytest.raises(UsageError, match=r"needs data of shape \(C, H, W\)"):
        build_model("unet", (16,))


def test_mlp_overfits_a_fixed_mapping():
    gen = torch.Generator().manual_seed(0)
    x, lam = torch.randn(64, 2, generator=gen), 10 * torch.rand(64, generator=gen) - 5
    target = torch.stack([torch.sin(2 * x[:, 0]) * torch.tanh(lam), x[:, 0] * x[:, 1]], dim=1)  # (64, 2)
    torch.manual_seed(0)
    model = MLPDenoiser(2, hidden=64, depth=2, emb_dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = (model(x, lam) - target).square().mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = (model(x, lam) - target).square().mean().item()
    assert final < first / 10, (first, final)


def test_a_snapshot_from_before_the_mid_blocks_default_changed_still_loads(tmp_path):
    """Runs saved when the U-Net's default mid_blocks was 2 have no mid_blocks in their config: the number
    comes from the weights (results/digits-cpu holds such runs)."""
    from adaptive_sched import checkpoint, config as cfg
    from adaptive_sched.models import params_for_weights
    from adaptive_sched.sample_run import load_snapshot
    model = build_model("unet", (1, 8, 8), channels=[8], emb_dim=16, mid_blocks=2)
    raw = cfg.from_dict({"data": {"name": "digits"}, "model": {"name": "unet", "channels": [8],
                                                                "emb_dim": 16}}).to_dict()
    assert "mid_blocks" not in raw["model"]
    (tmp_path / "run").mkdir()
    checkpoint.atomic_save({"kind": "ema", "step": 1, "config": raw, "model": model.state_dict(),
                            "data_shape": [1, 8, 8]}, tmp_path / "run" / "ema.pt")
    _, loaded, _ = load_snapshot(tmp_path / "run", torch.device("cpu"))
    assert len(loaded.mid) == 2 and count_parameters(loaded) == count_parameters(model)
    assert params_for_weights("unet", {"mid_blocks": 1}, model.state_dict()) == {"mid_blocks": 1}  # given: kept
    assert params_for_weights("mlp", {}, {}) == {}


def test_a_snapshot_records_the_constructor_arguments_so_a_later_default_change_cannot_alter_it(tmp_path,
                                                                                                  monkeypatch):
    from adaptive_sched import checkpoint, config as cfg, models
    from adaptive_sched.models import constructor_params
    from adaptive_sched.sample_run import load_snapshot
    from adaptive_sched.train import train
    assert constructor_params("auto", (1, 8, 8), {"channels": [8]})["channels"] == [8]
    assert constructor_params("auto", (1, 8, 8), {})["mid_blocks"] == 1                  # the default, written out
    assert "in_channels" not in constructor_params("unet", (1, 8, 8), {})                 # shape args stay out
    config = cfg.from_dict({"data": {"name": "digits"}, "model": {"name": "auto", "channels": [8], "emb_dim": 16},
                            "train": {"steps": 2, "batch_size": 16, "device": "cpu", "checkpoint_every": 2},
                            "eval": {"every": 100, "n": 16, "sample_n": 0, "logsnr_points": 3}})
    train(config, tmp_path / "run", progress=False)
    snap = checkpoint.load_ema_snapshot(tmp_path / "run")
    assert snap["model_name"] == "unet" and snap["model_params"]["mid_blocks"] == 1
    import functools
    original = models.UNet.__init__                      # a later version whose default mid_blocks is 3

    @functools.wraps(original)
    def later(self, *args, mid_blocks=3, **kwargs):
        original(self, *args, mid_blocks=mid_blocks, **kwargs)
    monkeypatch.setattr(models.UNet, "__init__", later)
    assert len(build_model("unet", (1, 8, 8), channels=[8], emb_dim=16).mid) == 3     # the new default bites
    _, loaded, _ = load_snapshot(tmp_path / "run", torch.device("cpu"))
    assert len(loaded.mid) == 1                                                          # but not old runs


def training_step_flops(model: nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs per image of one forward + backward pass (torch.utils.flop_counter, as bench counts them)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, *shape)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(2)).square().mean().backward()
    return counter.get_total_flops() / 2


def test_the_reference_layout_has_the_performance_issues_size():
    """Issue 6 / ../shared/GPU.md: 4.16M parameters and 5.09 GFLOP per image per training step at 1x32x32; the
    default layout is 4.62M and 6.84 GFLOP."""
    from adaptive_sched.models.unet import REFERENCE_LAYOUT
    model = build_model("unet", (1, 32, 32), **REFERENCE_LAYOUT)
    assert round(count_parameters(model) / 1e6, 2) == 4.16
    assert round(training_step_flops(model, (1, 32, 32)) / 1e9, 2) == 5.09
    assert round(training_step_flops(build_model("unet", (1, 32, 32)), (1, 32, 32)) / 1e9, 2) == 6.84


def test_level_skips_feed_only_each_levels_first_up_block():
    model = UNet(1, 16, channels=(8, 16), emb_dim=16, groups=8, skips="level")
    assert model.skip_out == [False, True, False, False, True]             # block, block, down, block, block
    assert model.skip_in == [True, False, False, True, False]              # block, block, up, block, block
    first_up = [layer[0].conv1.in_channels for layer in model.up if isinstance(layer, nn.ModuleList)]
    assert first_up == [16 + 16, 16, 16 + 8, 8]
    default = UNet(1, 16, channels=(8, 16), emb_dim=16, groups=8)
    assert default.skip_out == [True, True, False, True, True] and default.skip_in == [True, True, False, True, True]


@pytest.mark.parametrize("layout", [dict(skips="level"), dict(downsample="avgpool"), dict(upsample="nearest"),
                                    dict(emb_hidden=24), dict(skips="level", downsample="avgpool",
                                                              upsample="nearest", blocks_per_level=3)])
def test_unet_layouts_train_every_parameter(layout):
    torch.manual_seed(0)
    model = unzero(UNet(1, 16, channels=(8, 16, 16), emb_dim=16, groups=8, num_classes=3, **layout))
    x = torch.randn(3, 1, 16, 16)
    out = model(x, torch.randn(3) * 5, torch.tensor([0, 1, 3]))
    assert out.shape == x.shape
    out.square().sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def test_pooling_and_nearest_layouts_have_no_resampling_weights():
    plain = UNet(1, 16, channels=(8, 16), emb_dim=16, groups=8)
    light = UNet(1, 16, channels=(8, 16), emb_dim=16, groups=8, downsample="avgpool", upsample="nearest")
    down, up = 8 * 8 * 9 + 8, 16 * 16 * 9 + 16            # 3x3 convs: down after level 0 (8), up after level 1 (16)
    assert count_parameters(plain) - count_parameters(light) == down + up
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    from adaptive_sched.models.unet import Downsample, Upsample
    torch.testing.assert_close(Downsample(1, "avgpool")(x), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    torch.testing.assert_close(Upsample(1, "nearest")(x)[0, 0, :2, :2], torch.zeros(2, 2))
    assert Upsample(1, "nearest")(x).shape == (1, 1, 8, 8)


def test_emb_hidden_sets_the_embedding_mlp_width_only():
    model = UNet(1, 8, channels=(8,), emb_dim=16, groups=8, emb_hidden=40)
    assert [m.out_features for m in model.embed.mlp if isinstance(m, nn.Linear)] == [40, 16]
    assert [m.out_features for m in UNet(1, 8, channels=(8,), emb_dim=16, groups=8).embed.mlp
            if isinstance(m, nn.Linear)] == [16, 16]


@pytest.mark.parametrize("option, value, match", [("skips", "every", "skips must be one of 'block', 'level'"),
                                                  ("downsample", "max", "downsample must be one of"),
                                                  ("upsample", "bilinear", "upsample must be one of"),
                                                  ("emb_hidden", 0, "emb_hidden must be an integer >= 1"),
                                                  ("emb_hidden", 8.5, "emb_hidden must be an integer")])
def test_unet_layout_options_are_checked(option, value, match):
    with pytest.raises(UsageError, match=match):
        build_model("unet", (1, 8, 8), channels=(8,), groups=8, **{option: value})


def test_the_default_layout_keeps_its_weight_names():
    """Old checkpoints load by these names: the layout options must not rename the default net's modules."""
    keys = set(UNet(1, 8, channels=(8, 16), emb_dim=16, groups=8).state_dict())
    assert {"down.2.conv.weight", "up.2.conv.weight", "embed.mlp.0.weight", "embed.mlp.2.weight"} <= keys
    light = set(UNet(1, 8, channels=(8, 16), emb_dim=16, groups=8, downsample="avgpool",
                     upsample="nearest").state_dict())
    assert keys - light == {"down.2.conv.weight", "down.2.conv.bias", "up.2.conv.weight", "up.2.conv.bias"}


def test_the_default_layout_computes_what_the_unet_computed_before_the_layout_options():
    """The forward pass as written before skips/downsample/upsample existed (every down ResBlock's output kept,
    one popped before every up ResBlock), run on the same modules: old runs' weights mean what they meant."""
    from adaptive_sched.models.unet import Downsample, Upsample
    torch.manual_seed(0)
    model = unzero(UNet(2, 16, channels=(8, 16, 16), emb_dim=16, groups=8, attention_levels=(1,), num_classes=3,
                        mid_blocks=2))
    x, lam, y = torch.randn(3, 2, 16, 16), torch.randn(3) * 4, torch.tensor([0, 2, 3])
    emb = model.embed(lam, y)
    h, kept = model.conv_in(x), []
    for layer in model.down:
        h = layer(h, emb)
        if not isinstance(layer, Downsample):
            kept.append(h)
    h = model.mid(h, emb)
    for layer in model.up:
        if not isinstance(layer, Upsample):
            h = torch.cat([h, kept.pop()], dim=1)
        h = layer(h, emb)
    reference = model.out(torch.nn.functional.silu(model.out_norm(h)))
    assert not kept
    assert torch.equal(model(x, lam, y), reference)
