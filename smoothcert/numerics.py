"""Running a base network in a numeric mode (see `smoothcert.modes`).

`ModeNetwork` is what the sampler calls: `logits = mode_network(batch)`, float32 logits
whatever the compute dtype. The noise is always drawn and added in float32; only the
network's arithmetic changes with the mode. The stored network is never modified: modes
that fold BatchNorm or change the memory format work on a copy, so one bundle serves
several modes.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_weights

from smoothcert.bounds import InvalidParameters
from smoothcert.modes import NumericMode, parse_mode

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_aten = torch.ops.aten
_ATEN_CONVS = (_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default)


def _batch_norms(gm: fx.GraphModule) -> int:
    """BatchNorm calls left in a traced graph (modules, and aten ops of .pt2 programs)."""
    modules = dict(gm.named_modules())
    return sum(1 for n in gm.graph.nodes
               if (n.op == "call_module" and isinstance(modules.get(n.target), _BatchNorm))
               or (n.op == "call_function" and n.target is _aten.batch_norm.default))


def _fold_aten_batch_norms(gm: fx.GraphModule) -> None:
    """Fold `aten.batch_norm(aten.convNd(x, w, b, ...), ...)` in inference mode (training=False,
    the conv's only user, every tensor a graph attribute): how a loaded .pt2 program
    (torch.export) spells conv → BatchNorm, which fx's module patterns do not see."""
    graph = gm.graph

    def attr(arg):  # the tensor behind a get_attr node, None for None, else False
        if arg is None:
            return None
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return functools.reduce(getattr, arg.target.split("."), gm)
        return False

    folded = 0
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target is not _aten.batch_norm.default or bn.kwargs \
                or len(bn.args) < 8:
            continue
        conv, weight, bias, mean, var, training, _momentum, eps = bn.args[:8]
        if training is not False or not isinstance(conv, fx.Node) or conv.op != "call_function" \
                or conv.target not in _ATEN_CONVS or conv.kwargs or len(conv.users) != 1:
            continue
        conv_args = list(conv.args) + [None] * (3 - len(conv.args))
        tensors = [attr(a) for a in (conv_args[1], conv_args[2], mean, var, weight, bias)]
        cw, cb, rm, rv, bw, bb = tensors
        if any(t is False for t in tensors) or cw is None or rm is None or rv is None:
            continue
        fused_w, fused_b = fuse_conv_bn_weights(cw, cb, rm, rv, eps, bw, bb)
        names = (f"_fused_bn_{folded}_weight", f"_fused_bn_{folded}_bias")
        gm.register_buffer(names[0], fused_w.detach())
        gm.register_buffer(names[1], fused_b.detach())
        with graph.inserting_before(conv):
            conv_args[1], conv_args[2] = graph.get_attr(names[0]), graph.get_attr(names[1])
        old = [a for a in (conv.args[1:3] + bn.args[1:5]) if isinstance(a, fx.Node)]
        conv.args = tuple(conv_args)
        bn.replace_all_uses_with(conv)
        graph.erase_node(bn)
        for node in old:
            if not node.users:
                graph.erase_node(node)
        folded += 1
    if folded:
        graph.lint()
        gm.recompile()


def fold_batch_norm(network: nn.Module) -> tuple[nn.Module, int]:
    """`network` with each BatchNorm folded into the convolution (or linear layer) before it,
    for inference, and how many were folded; `network` itself is not modified.

    Folding uses the running statistics, so the network must be in eval mode. It is traced
    with torch.fx: a network that cannot be traced is refused (InvalidParameters), never run
    unfused under the +fuse name. With nothing to fold, the network itself is returned (the
    same function, exactly)."""
    if any(m.training for m in network.modules() if isinstance(m, (_BatchNorm, _ConvNd, nn.Linear))):
        raise InvalidParameters("numeric mode +fuse folds BatchNorm's running statistics into the "
                                "convolutions: the network must be in eval mode")
    try:
        traced = fx.symbolic_trace(copy.deepcopy(network))
    except Exception as e:
        raise InvalidParameters(f"numeric mode +fuse needs a network torch.fx can trace, and this one "
                                f"cannot be ({type(e).__name__}: {e}); use the mode without +fuse") from None
    before = _batch_norms(traced)
    if before == 0:
        return network, 0
    fused = fx_fuse(traced, inplace=True, no_trace=True)  # nn.Conv*/Linear → nn.BatchNorm* modules
    _fold_aten_batch_norms(fused)  # .pt2 programs: aten.conv* → aten.batch_norm
    return fused, before - _batch_norms(fused)


class ModeNetwork:
    """`network` run in `mode` on `device`: a callable batch → float32 logits.

    Compiled modes compile lazily on the first call for each batch shape (torch.compile's
    cost); `warm_up` pays it up front, once per process.
    """

    def __init__(self, network: nn.Module, mode: NumericMode | str, device: torch.device | str):
        self.mode = parse_mode(mode)
        self.device = torch.device(device)
        self.mode.check_device(self.device.type)
        self.base = network
        net, self.folded = network, 0  # folded: BatchNorms folded into convolutions (+fuse)
        if self.mode.fuse:
            net, self.folded = fold_batch_norm(network)
        if self.mode.channels_last:
            net = copy.deepcopy(net).to(memory_format=torch.channels_last)
        if self.mode.compiled:
            net = torch.compile(net, mode="reduce-overhead" if self.mode.cuda_graphs else None)
        self.network = net
        self._autocast = _AUTOCAST.get(self.mode.dtype)

    @property
    def name(self) -> str:
        return self.mode.name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.mode.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self._autocast is None:
            return self.network(batch)
        with torch.autocast(self.device.type, dtype=self._autocast):
            logits = self.network(batch)
        return logits.float()

    def warm_up(self, input_shape: tuple[int, ...], batch_sizes: tuple[int, ...]) -> None:
        """One forward per batch size, so that compiled modes compile now, not in a job."""
        with torch.inference_mode():
            for size in batch_sizes:
                self(torch.zeros((size, *input_shape), device=self.device))


def pin_ieee_fp32(device: torch.device | str) -> None:
    """On CUDA, float32 convolutions and matrix products in IEEE float32, for this process.

    By default PyTorch lets cuDNN run float32 convolutions in TF32 (a 10-bit mantissa) on
    Ampere and later GPUs: mode "fp32" would then evaluate a reduced-precision function that
    neither the certificate nor the memory namespace names. bf16 and fp16 ask for reduced
    precision through autocast, which these switches leave alone. The legacy switches are set
    because reading them fails once the newer `fp32_precision` ones have been set."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def in_mode(network: nn.Module, mode: NumericMode | str | None, device) -> nn.Module | ModeNetwork:
    """`network` itself in fp32 without flags (nothing to wrap), else a ModeNetwork; on CUDA,
    float32 arithmetic is IEEE float32 from then on (`pin_ieee_fp32`)."""
    pin_ieee_fp32(device)
    parsed = parse_mode(mode)
    if parsed == NumericMode():
        return network
    return ModeNetwork(network, parsed, device)
