"""Numeric modes: names, device checks, that the mode is really applied, and that every
mode a device can run passes the exact-answer soundness check (docs/algorithms.md §8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smoothcert.architectures import build_architecture
from smoothcert.bounds import InvalidParameters
from smoothcert.bundle import ModelSpec, SigmaRange, load_bundle, save_bundle
from smoothcert.modes import NumericMode, canonical_mode, parse_mode
from smoothcert.numerics import ModeNetwork, in_mode
from smoothcert.smoothing import certify

from .exact import HalfSpace, assert_rate_at_most, point_at

SHAPE = (3, 4, 4)  # 4-d batches, so channels_last changes the memory format
SIGMA = 0.25
CPU_MODES = ["fp32", "fp32+channels_last", "bf16", "bf16+channels_last",
             "fp32+fuse", "bf16+fuse", "bf16+fuse+channels_last"]
FUSE_MODES = [m for m in CPU_MODES if "fuse" in m]
CUDA_MODES = ["fp16", "fp16+channels_last", "fp16+fuse+channels_last", "bf16+cuda_graphs"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize(("name", "canonical"), [
    (None, "fp32"), ("fp32", "fp32"), ("bf16", "bf16"),
    ("bf16+compile+channels_last", "bf16+channels_last+compile"),
    ("fp16+cuda_graphs", "fp16+cuda_graphs"), ("fp32+fuse", "fp32+fuse"),
    ("bf16+channels_last+fuse", "bf16+fuse+channels_last"),
    ("fp16+cuda_graphs+fuse", "fp16+fuse+cuda_graphs"),
])
def test_names_are_canonical(name, canonical):
    assert canonical_mode(name) == canonical
    assert parse_mode(canonical).name == canonical


@pytest.mark.parametrize(("name", "message"), [
    ("fp64", "unknown dtype"), ("bf16+fast", "unknown flag"), ("", "non-empty"),
    ("fp32+compile+compile", "repeats"), ("fp16+compile+cuda_graphs", "not both"),
    ("fp32+fuse+fuse", "repeats"), ("fuse", "unknown dtype"),
])
def test_bad_names_are_refused(name, message):
    with pytest.raises(InvalidParameters, match=message):
        parse_mode(name)


@pytest.mark.parametrize("name", ["fp16", "fp32+cuda_graphs"])
def test_cuda_only_modes_are_refused_on_the_cpu(name):
    with pytest.raises(InvalidParameters, match="needs a CUDA device"):
        ModeNetwork(nn.Linear(2, 2), name, "cpu")


def test_fp32_without_flags_is_the_network_itself():
    net = nn.Linear(2, 2)
    assert in_mode(net, "fp32", "cpu") is net
    assert isinstance(in_mode(net, NumericMode("bf16"), "cpu"), ModeNetwork)


def test_bf16_really_computes_in_bf16_and_returns_float32():
    torch.manual_seed(0)
    net = nn.Linear(64, 10).eval()
    seen = []
    net.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x = torch.randn(32, 64)
    with torch.inference_mode():
        exact, low = net(x), ModeNetwork(net, "bf16", "cpu")(x)
    assert seen == [torch.float32, torch.bfloat16]
    assert low.dtype == torch.float32
    assert not torch.equal(exact, low) and torch.allclose(exact, low, atol=0.1)


def test_channels_last_leaves_the_stored_network_alone():
    conv = nn.Conv2d(3, 4, 3).eval()
    wrapped = ModeNetwork(conv, "fp32+channels_last", "cpu")
    assert conv.weight.is_contiguous()
    assert wrapped.network.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(wrapped(x), conv(x), atol=1e-5)


def test_fuse_is_a_parsed_flag_that_runs_on_the_cpu():
    mode = parse_mode("bf16+channels_last+fuse")
    assert mode.fuse and mode.channels_last and mode.dtype == "bf16" and mode.needs_cuda() == []
    assert not parse_mode("bf16+channels_last").fuse
    mode.check_device("cpu")


def _with_batch_norm_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from their initial values, so that
    folding them into the convolutions changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return net.eval()


@pytest.mark.parametrize("fmt", ["state_dict", "pt2"])
@pytest.mark.parametrize(("arch", "shape", "folded"), [
    ("cifar_resnet20", (3, 16, 16), 21), ("digits_cnn", (1, 8, 8), 0),
])
def test_fuse_folds_batch_norm_and_keeps_the_function(tmp_path, fmt, arch, shape, folded):
    """A bundle as workers load it (Normalize in front; state dict or torch.export program):
    every BatchNorm is folded, the fp32 logits stay within float32 rounding, and the stored
    network is untouched."""
    torch.manual_seed(0)
    net = _with_batch_norm_statistics(build_architecture(arch, shape, 10))
    spec = ModelSpec(name="m", input_shape=shape, num_classes=10, sigma=SigmaRange(0.25, 0.25, 0.25),
                     architecture=arch, normalize=((0.5,) * shape[0], (0.25,) * shape[0]))
    save_bundle(tmp_path, spec, net, fmt=fmt)
    stored = load_bundle(tmp_path).classifier
    before = {k: v.clone() for k, v in stored.state_dict().items()}
    modules_before = list(stored.modules())
    fused = ModeNetwork(stored, "fp32+fuse", "cpu")
    assert fused.folded == folded
    assert (fused.network is stored) == (folded == 0)  # nothing to fold: the network itself
    x = torch.rand(7, *shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact, got = stored(x), fused(x)
        low = ModeNetwork(stored, "bf16+fuse+channels_last", "cpu")(x)
    assert got.dtype == torch.float32
    assert (got - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert (low - exact).abs().max() <= 0.05 * exact.abs().max()  # bf16: close, not equal
    if folded:
        assert not torch.equal(got, exact)  # the arithmetic did change (hence the name)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.network.modules())
    # the stored network: same modules, same tensors, still in eval mode
    assert list(stored.modules()) == modules_before and not stored.training
    after = stored.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if fmt == "state_dict" and folded:
        assert sum(isinstance(m, nn.BatchNorm2d) for m in stored.modules()) == folded


def test_fuse_refuses_a_network_in_training_mode():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # train mode
    with pytest.raises(InvalidParameters, match="eval mode"):
        ModeNetwork(net, "fp32+fuse", "cpu")


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 2, 4), nn.BatchNorm2d(2)

    def forward(self, x):
        out = self.bn(self.conv(x)).flatten(1)
        return out if out.sum() > 0 else -out  # control flow on values: fx cannot trace it


def test_fuse_refuses_a_network_fx_cannot_trace_rather_than_run_it_unfused():
    net = _DataDependent().eval()
    with pytest.raises(InvalidParameters, match=r"\+fuse needs a network torch.fx can trace"):
        ModeNetwork(net, "fp32+fuse", "cpu")
    ModeNetwork(net, "fp32+channels_last", "cpu")  # the other modes do not trace


def exact_model() -> HalfSpace:
    """f(x) = [x₀ > 0]: one input coordinate with weight 1 and no offset. Rounding a number
    to bf16/fp16 keeps its sign, so in every mode this is exactly the float32 function and
    the exact answers of docs/algorithms.md §8 hold."""
    w = torch.zeros(SHAPE).flatten()
    w[0] = 1.0
    return HalfSpace(w, b=0.0).eval()


class ConvBatchNormHalfSpace(HalfSpace):
    """The same f(x) = [x₀ > 0] through a convolution and a BatchNorm: the convolution picks
    x₀ (weight 1 there, 0 elsewhere, no bias), the BatchNorm multiplies by γ/√(var+ε) > 0 and
    adds nothing (mean and β 0). Folded or not, in every dtype, the logit is x₀ times a
    positive number, rounded: its sign is x₀'s, so the exact answers hold for +fuse too."""

    def __init__(self):
        w = torch.zeros(SHAPE).flatten()
        w[0] = 1.0
        super().__init__(w, b=0.0)
        self.conv = nn.Conv2d(SHAPE[0], 1, SHAPE[1:], bias=False)
        self.bn = nn.BatchNorm2d(1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 0, 0] = 1.0
            self.bn.weight.fill_(1.7)
            self.bn.running_var.fill_(2.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bn(self.conv(x)).flatten(1)
        return torch.cat([-z, z], dim=1) * (self.scale / 2)


def violations_in_mode(mode: str, device: str, *, runs: int, n: int, alpha: float, distance_in_sigmas: float,
                       make_model=exact_model):
    model = make_model().eval().to(device)
    network = ModeNetwork(model, mode, device)
    x = point_at(model.cpu(), SHAPE, distance_in_sigmas * SIGMA).to(device)
    model.to(device)
    exact = abs(float(model.signed_distance(x.unsqueeze(0))))
    truth = 1 if distance_in_sigmas > 0 else 0
    bad = 0
    for seed in range(runs):
        cert = certify(network, x, num_classes=2, sigma=SIGMA, n0=50, n=n, alpha=alpha,
                       batch_size=n, seed=seed)
        if cert.prediction is not None and (cert.radius > exact or cert.prediction != truth):
            bad += 1
    return bad


def _check_mode(mode: str, device: str, make_model=exact_model) -> None:
    runs, alpha = 600, 0.1
    bad = violations_in_mode(mode, device, runs=runs, n=400, alpha=alpha, distance_in_sigmas=0.6,
                             make_model=make_model)
    assert_rate_at_most(bad, runs, alpha, f"{mode} radius above the exact distance")
    # and with large n the radius comes close to the exact one (the mode computes f exactly)
    model = make_model().eval().to(device)
    x = point_at(model.cpu(), SHAPE, 1.0 * SIGMA).to(device)
    model.to(device)
    cert = certify(ModeNetwork(model, mode, device), x, num_classes=2, sigma=SIGMA, n0=100, n=100_000,
                   alpha=0.001, batch_size=20_000, seed=1)
    assert cert.prediction == 1 and 0.8 * SIGMA < cert.radius <= SIGMA


@pytest.mark.parametrize("mode", CPU_MODES)
def test_cpu_modes_pass_the_exact_answer_checks(mode):
    _check_mode(mode, "cpu")


def test_the_batch_norm_exact_model_is_folded_and_exact():
    model = ConvBatchNormHalfSpace().eval()
    fused = ModeNetwork(model, "fp32+fuse", "cpu")
    assert fused.folded == 1
    x = torch.randn(1000, *SHAPE)
    with torch.inference_mode():
        for network in (model, fused, ModeNetwork(model, "bf16+fuse+channels_last", "cpu")):
            assert torch.equal(network(x).argmax(1), (x.flatten(1)[:, 0] > 0).long())


@pytest.mark.parametrize("mode", FUSE_MODES)
def test_fuse_modes_pass_the_exact_answer_checks_with_a_batch_norm_to_fold(mode):
    _check_mode(mode, "cpu", ConvBatchNormHalfSpace)


@pytest.mark.slow
def test_compiled_mode_passes_the_exact_answer_checks():
    _check_mode("fp32+compile", "cpu")


@needs_cuda
@pytest.mark.parametrize("mode", CUDA_MODES + CPU_MODES)
def test_cuda_modes_pass_the_exact_answer_checks(mode):
    _check_mode(mode, "cuda")


@needs_cuda
@pytest.mark.parametrize("mode", ["fp32+fuse", "fp16+fuse+channels_last"])
def test_cuda_fuse_modes_pass_the_exact_answer_checks_with_a_batch_norm_to_fold(mode):
    _check_mode(mode, "cuda", ConvBatchNormHalfSpace)


def test_a_cuda_network_pins_float32_to_ieee():
    # cuDNN's default runs float32 convolutions in TF32 on Ampere and later: mode "fp32"
    # would not be the function its name says. Setting the switches needs no GPU.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        in_mode(nn.Conv2d(1, 1, 3), "fp32", "cpu")
        assert torch.backends.cudnn.allow_tf32  # a CPU network changes nothing
        in_mode(nn.Conv2d(1, 1, 3), "fp32", "cuda")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@needs_cuda
def test_cuda_fp32_convolutions_are_ieee_float32():
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 3, padding=1).cuda().eval()
    x = torch.randn(8, 256, 16, 16, device="cuda")
    net = in_mode(conv, "fp32", "cuda")
    with torch.inference_mode():
        got, exact = net(x).double(), conv.double()(x.double())
    # IEEE float32 over 2,304 products: ~1e-6 relative; TF32's 10-bit mantissa: ~1e-3.
    assert ((got - exact).abs().max() / exact.abs().max()).item() < 1e-4
