"""Tests of debiaslab.nets: shapes, conditioning, float timesteps, the h-space tap, classifier."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from debiaslab.config import ModelConfig
from debiaslab.errors import ConfigError
from debiaslab.nets import NETS, EncoderClassifier, UNet, num_parameters, timestep_embedding

BATCH = 4
SIZE = 8
TINY = dict(image_size=SIZE, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), head_channels=8)
PERTURB_STD = 0.05  # moves every weight off its (zero) init so outputs depend on all inputs


def _tiny_unet(**overrides: object) -> UNet:
    torch.manual_seed(0)
    return UNet(1, 1, **{**TINY, **overrides})  # type: ignore[arg-type]


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(PERTURB_STD * torch.randn(p.shape, generator=gen))
    return model.eval()


def _inputs(channels: int = 1, size: int = SIZE, seed: int = 2) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, channels, size, size, generator=gen)
    t = torch.rand(BATCH, generator=gen) * 999.0
    return x, t


# ---------------------------------------------------------------- shapes and conditioning


@pytest.mark.parametrize(
    "in_ch, out_ch, size, kwargs",
    [
        (1, 1, 8, dict(model_channels=16, channel_mult=(1, 2), attention_resolutions=())),
        (3, 6, 16, dict(model_channels=16, channel_mult=(1, 2, 2), attention_resolutions=(8, 4),
                        num_classes=5, num_heads=2)),
        (3, 3, 8, dict(model_channels=16, channel_mult=(1, 2), attention_resolutions=(4,),
                       aug_dim=9, num_classes=10, head_channels=8, dropout=0.1)),
        (1, 2, 16, dict(model_channels=8, channel_mult=(1, 2, 4), num_res_blocks=2,
                        attention_resolutions=(4,), resblock_updown=True,
                        use_scale_shift_norm=False)),
    ],
)
def test_unet_shapes_and_zero_init(in_ch: int, out_ch: int, size: int, kwargs: dict) -> None:
    torch.manual_seed(0)
    net = UNet(in_ch, out_ch, image_size=size, **kwargs)
    x, t = _inputs(in_ch, size)
    y = torch.arange(BATCH) % kwargs["num_classes"] if "num_classes" in kwargs else None
    aug = torch.randn(BATCH, kwargs["aug_dim"]) if "aug_dim" in kwargs else None
    out, h = net(x, t, y=y, aug=aug, return_h=True)
    assert out.shape == (BATCH, out_ch, size, size)
    assert h.shape == (BATCH, *net.h_shape())
    assert torch.count_nonzero(out) == 0  # zero-initialised final conv
    assert net.null_label == kwargs.get("num_classes")


def test_small_config_parameter_budget() -> None:
    net = UNet(1, 1, image_size=16, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
               attention_resolutions=(8,))
    assert num_parameters(net) < 1_500_000
    assert net.h_shape() == (64, 4, 4)
    assert net.h_shape(32) == (64, 8, 8)


def test_null_label_and_aug_defaults() -> None:
    net = _perturb(_tiny_unet(num_classes=3, aug_dim=2))
    x, t = _inputs()
    null = torch.full((BATCH,), net.null_label, dtype=torch.long)
    with torch.no_grad():
        out_none = net(x, t)
        assert torch.equal(out_none, net(x, t, y=null))
        assert torch.equal(out_none, net(x, t, y=null, aug=torch.zeros(BATCH, 2)))
        assert not torch.allclose(out_none, net(x, t, y=torch.zeros(BATCH, dtype=torch.long)))
        assert not torch.allclose(out_none, net(x, t, aug=torch.ones(BATCH, 2)))


def test_conditioning_misuse_raises() -> None:
    net = _tiny_unet()
    x, t = _inputs()
    with pytest.raises(ValueError, match="num_classes=None"):
        net(x, t, y=torch.zeros(BATCH, dtype=torch.long))
    with pytest.raises(ValueError, match="aug_dim=0"):
        net(x, t, aug=torch.zeros(BATCH, 9))
    with pytest.raises(ValueError, match="timesteps"):
        net(x, torch.zeros(BATCH + 1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention_resolutions=(3,)), "allowed"),
        (dict(image_size=6, channel_mult=(1, 2, 2)), "divisible"),
        (dict(head_channels=5), "head_channels"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_invalid_architecture_is_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        UNet(1, 1, **{**TINY, **kwargs})  # type: ignore[arg-type]


def test_registry_builds_both_networks() -> None:
    assert {"unet", "encoder_classifier"} <= set(NETS.names())
    assert isinstance(NETS.build("unet", 1, 1, **TINY), UNet)
    clf = NETS.build("encoder_classifier", 1, 3, image_size=SIZE, model_channels=16,
                     channel_mult=(1, 2))
    assert isinstance(clf, EncoderClassifier)
    with pytest.raises(ConfigError, match="allowed"):
        NETS.get("resnet")


# ---------------------------------------------------------------- float timesteps


def test_timestep_embedding_is_continuous_in_fractional_t() -> None:
    dim = 64
    t = torch.tensor([0.0, 0.5, 499.5, 998.25], dtype=torch.float32)
    dt = 1e-3
    emb, emb_dt = timestep_embedding(t, dim), timestep_embedding(t + dt, dim)
    assert emb.shape == (4, dim) and timestep_embedding(t, dim + 1).shape == (4, dim + 1)
    # every frequency is <= 1, so each component is 1-Lipschitz in t
    assert (emb_dt - emb).abs().max() <= 1.01 * dt
    half_step = timestep_embedding(torch.tensor([499.0, 499.5, 500.0]), dim)
    assert not torch.allclose(half_step[1], half_step[0])
    assert not torch.allclose(half_step[1], half_step[2])


def test_unet_output_is_continuous_in_t() -> None:
    net = _perturb(_tiny_unet())
    x, _ = _inputs()
    t = torch.full((BATCH,), 437.25)
    with torch.no_grad():
        out = net(x, t)
        small = (net(x, t + 1e-3) - out).abs().max()
        large = (net(x, t + 50.0) - out).abs().max()
        assert torch.equal(net(x, 437.25), out)  # a python float broadcasts over the batch
    assert torch.isfinite(out).all()
    assert large > 0 and small < 1e-2 * large


# ---------------------------------------------------------------- h-space tap


def test_return_h_and_identity_edit() -> None:
    net = _perturb(_tiny_unet())
    x, t = _inputs()
    with torch.no_grad():
        out, h = net(x, t, return_h=True)
        assert h.shape == (BATCH, *net.h_shape()) == (BATCH, 32, 4, 4)
        seen_t = []
        with net.h_edit(lambda h_, t_: seen_t.append(t_) or h_):
            out_edit = net(x, t)
    assert torch.equal(out, out_edit)
    assert torch.equal(seen_t[0], t)


def test_h_edit_replaces_h_and_keeps_original_skips() -> None:
    net = _perturb(_tiny_unet())
    x, t = _inputs(seed=2)
    x_other, _ = _inputs(seed=3)
    with torch.no_grad():
        out_x = net(x, t)
        out_other, h_other = net(x_other, t, return_h=True)
        with net.h_edit(lambda h, t_: h_other):
            out_edit, h_used = net(x, t, return_h=True)
    assert torch.equal(h_used, h_other)
    assert not torch.allclose(out_edit, out_x)
    assert not torch.allclose(out_edit, out_other)  # decoder still uses x's encoder skips


def test_gradient_wrt_edited_h_without_grad_on_x() -> None:
    net = _perturb(_tiny_unet())
    x, t = _inputs()
    leaves: list[Tensor] = []

    def edit(h: Tensor, t_: Tensor) -> Tensor:
        leaf = (h.detach() + 0.1).requires_grad_(True)
        leaves.append(leaf)
        return leaf

    with net.h_edit(edit):
        out = net(x, t)
    (grad_h,) = torch.autograd.grad(out.square().sum(), leaves[0])
    assert not x.requires_grad and x.grad is None
    assert grad_h.shape == leaves[0].shape and grad_h.abs().sum() > 0


def test_nested_h_edit_restores_previous_state() -> None:
    net = _tiny_unet()
    x, t = _inputs()
    calls: list[str] = []

    def outer(h: Tensor, t_: Tensor) -> Tensor:
        calls.append("outer")
        return h

    def inner(h: Tensor, t_: Tensor) -> Tensor:
        calls.append("inner")
        return h

    with torch.no_grad():
        with net.h_edit(outer):
            net(x, t)
            with net.h_edit(inner):
                net(x, t)
                with net.h_edit(None):
                    net(x, t)
            net(x, t)
            with pytest.raises(RuntimeError), net.h_edit(inner):
                raise RuntimeError("boom")
            net(x, t)
        net(x, t)
    assert calls == ["outer", "inner", "outer", "outer"]


def test_h_edit_module_is_not_registered_and_shape_is_checked() -> None:
    net = _tiny_unet()
    keys = set(net.state_dict())
    x, t = _inputs()

    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.delta = nn.Parameter(torch.zeros(()))

        def forward(self, h: Tensor, t_: Tensor) -> Tensor:
            return h + self.delta

    with net.h_edit(Shift()):
        assert set(net.state_dict()) == keys
        net(x, t)
    with net.h_edit(lambda h, t_: h[:, :1]), pytest.raises(ValueError, match="h shape"):
        net(x, t)


# ---------------------------------------------------------------- classifier


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_classifier_logits_and_gradient_wrt_x(pool: str) -> None:
    torch.manual_seed(0)
    clf = EncoderClassifier(1, 5, image_size=SIZE, model_channels=16, channel_mult=(1, 2),
                            attention_resolutions=(4,), pool=pool, head_channels=8)
    x, t = _inputs()
    x.requires_grad_(True)
    logits = clf(x, t)
    assert logits.shape == (BATCH, 5)
    assert clf.features(x, t).shape == (BATCH, clf.feature_dim)
    (grad,) = torch.autograd.grad(logits.log_softmax(-1)[:, 2].sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0


def test_classifier_class_conditioning_and_bad_pool() -> None:
    torch.manual_seed(0)
    clf = EncoderClassifier(3, 2, image_size=SIZE, model_channels=16, channel_mult=(1, 2),
                            num_classes_cond=4, pool="mean")
    _perturb(clf)
    x, t = _inputs(channels=3)
    with torch.no_grad():
        null = torch.full((BATCH,), 4, dtype=torch.long)
        assert torch.equal(clf(x, t), clf(x, t, y=null))
        assert not torch.allclose(clf(x, t), clf(x, t, y=torch.zeros(BATCH, dtype=torch.long)))
    with pytest.raises(ConfigError, match="allowed"):
        EncoderClassifier(1, 2, image_size=SIZE, pool="max")


# ---------------------------------------------------------------- determinism and training


def test_determinism_under_fixed_seed() -> None:
    a, b = _perturb(_tiny_unet(num_classes=3)), _perturb(_tiny_unet(num_classes=3))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(a(x, t), b(x, t))
        assert torch.equal(a(x, t), a(x, t))


def test_unet_overfits_a_fixed_batch() -> None:
    steps, lr, min_drop = 30, 3e-3, 5.0
    net = _tiny_unet(num_classes=2)
    x, t = _inputs()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (net(x, t, y) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / min_drop, losses[:: steps // 6]


# ---------------------------------------------------------------- build_net from a ModelConfig


def _model(net: str, **kw: object) -> ModelConfig:
    base = dict(net=net, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(), head_channels=8, class_conditional=False)
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


# (input shape, expected output shape with num_outputs=5) of each registered network
BUILD_CASES = {
    "unet": ((1, SIZE, SIZE), (BATCH, 5, SIZE, SIZE)),  # num_outputs: output channels
    "encoder_classifier": ((3, SIZE, SIZE), (BATCH, 5)),
    "mlp_head": ((6, 2, 2), (BATCH, 5)),
    "cascaded_classifier": ((1, SIZE, SIZE), (BATCH, 5)),  # a head on a trunk's 4x4 features
}


def _trunk(option: str, path: str) -> torch.nn.Module:
    """build_net's resolver for the cascaded classifier's trunk checkpoint: a fresh encoder."""
    from debiaslab.nets import build_net

    assert (option, path) == ("trunk", "trunk.pt")
    return build_net(_model("encoder_classifier"), shape=(1, SIZE, SIZE), num_classes=1,
                     num_outputs=3)


def test_every_network_of_the_nets_package_has_a_build_case() -> None:
    """Networks a method module registers (e.g. the cascaded minority classifier, which needs a
    trained trunk) are tested with their method."""
    core = {n for n in NETS.names() if NETS.get(n).__module__.startswith("debiaslab.nets")}
    assert core == set(BUILD_CASES), "add the new network to BUILD_CASES"


@pytest.mark.parametrize("name", sorted(BUILD_CASES))
def test_build_net_builds_every_registered_net_from_a_model_config(name: str) -> None:
    from debiaslab.nets import build_net

    shape, out_shape = BUILD_CASES[name]
    extra = {"options": {"trunk": "trunk.pt"}, "channel_mult": (1,)} \
        if name == "cascaded_classifier" else {}
    net = build_net(_model(name, **extra), shape=shape, num_classes=10, num_outputs=5,
                    resolve=_trunk)
    assert isinstance(net, NETS.get(name))
    x, t = torch.randn(BATCH, *shape), torch.rand(BATCH) * 999.0
    with torch.no_grad():
        out = net(x) if name == "mlp_head" else net(x, t)
    assert out.shape == out_shape


def test_build_net_matches_the_direct_constructor_and_conditioning_rules() -> None:
    from debiaslab.nets import build_net

    torch.manual_seed(0)
    built = build_net(_model("unet", class_conditional=True), shape=(1, SIZE, SIZE),
                      num_classes=3, aug_dim=9)
    torch.manual_seed(0)
    direct = UNet(1, 1, image_size=SIZE, model_channels=16, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(), head_channels=8, num_classes=3,
                  aug_dim=9)
    for (k, a), b in zip(built.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), k
    # one class (or class_conditional false): unconditional, as the score Trainer always did
    assert build_net(_model("unet", class_conditional=True), shape=(1, SIZE, SIZE),
                     num_classes=1).num_classes is None
    clf = build_net(_model("encoder_classifier", class_conditional=True,
                           options={"pool": "mean", "num_heads": 2}),
                    shape=(1, SIZE, SIZE), num_classes=4, num_outputs=2)
    assert clf.num_classes_cond == 4 and clf.pool_kind == "mean" and clf.num_outputs == 2
    head = build_net(_model("mlp_head", options={"time_conditional": True}, num_res_blocks=3),
                     shape=(7,), num_classes=0, num_outputs=3)
    assert head.time_conditional and len(head.blocks) == 3 and head.head.in_features == 16


@pytest.mark.parametrize("name, key", [("unet", "pool"), ("encoder_classifier", "num_classes"),
                                       ("mlp_head", "hiden"), ("unet", "model_channels")])
def test_unknown_model_option_is_a_one_line_config_error(name: str, key: str) -> None:
    from debiaslab.nets import build_net, net_options

    with pytest.raises(ConfigError) as info:
        build_net(_model(name, options={key: 1}), shape=(1, SIZE, SIZE), num_classes=2,
                  num_outputs=2, where="classifier.model")
    msg = str(info.value)
    assert f"classifier.model.options.{key}" in msg and "\n" not in msg
    assert "allowed: " + ", ".join(net_options(name)) in msg
    assert net_options("encoder_classifier") == ["num_heads", "pool", "resblock_updown",
                                                 "use_scale_shift_norm"]


def test_constructor_errors_name_the_section() -> None:
    from debiaslab.nets import build_net

    with pytest.raises(ConfigError, match=r"^model: .*pool 'max'; allowed"):
        build_net(_model("encoder_classifier", options={"pool": "max"}), shape=(1, SIZE, SIZE),
                  num_classes=2, num_outputs=2)
    with pytest.raises(ConfigError, match="needs num_outputs"):
        build_net(_model("encoder_classifier"), shape=(1, SIZE, SIZE), num_classes=2)


def test_mlp_head_time_conditioning() -> None:
    from debiaslab.nets import MLPHead

    torch.manual_seed(0)
    head = MLPHead((4, 3), 2, hidden=16, depth=2, time_conditional=True)
    x = torch.randn(BATCH, 4, 3)
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    with torch.no_grad():
        out = head(x, t)
        assert out.shape == (BATCH, 2)
        assert not torch.allclose(out, head(x, t + 100.0))
    with pytest.raises(ValueError, match="time-conditional"):
        head(x)
    with pytest.raises(ValueError, match="shape"):
        head(torch.randn(BATCH, 12), t)


def test_a_checkpoint_option_needs_a_caller_that_loads_it() -> None:
    from debiaslab.errors import ConfigError
    from debiaslab.nets import build_net

    with pytest.raises(ConfigError, match=r"model.options.trunk: names a checkpoint"):
        build_net(_model("cascaded_classifier", options={"trunk": "trunk.pt"}),
                  shape=(1, SIZE, SIZE), num_classes=1, num_outputs=5)
