"""Glow's coupling network (paper, section 3.3) as one op, with a backward that keeps the fewest wide tensors alive.

    r1 = relu(s1 * conv3x3(x, w1) + t1)     (ActNorm after a bias-free conv; without ActNorm: relu(conv(x, w1) + b1))
    r2 = relu(s2 * conv1x1(r1, w2) + t2)
    out = s3 * (conv3x3(r2, w3) + b3)        (s3 = exp(f * logs): the zero layer's output scale, or 1)

`coupling_network_reference` is that composition in plain PyTorch (what torch.compile compiles). The
`coupling_network` entry point computes the same map through `_CouplingNetworkFunction`, whose memory is the point:
at 256x256 the hidden tensors (512 channels at 128x128, 32 MiB each in float32) are the peak of a reversible
training step, and plain autograd keeps about six of them (each convolution's input, the padded copies that edge
padding concatenates, each ActNorm's input, each ReLU's output) plus the transients of their backwards.

Three exact rewrites:
1. Per-output-channel scales and shifts fold into the convolutions, w' = s * w, b' = s * b + t: ActNorm costs no
   pass over the wide tensors, and its gradients come from the folded weights' (dL/ds = sum_{i,k} dL/dw' * w,
   dL/dt = dL/db'). The folding is a few small tensor ops left to autograd, so the Function sees three
   convolutions with biases and two ReLUs.
2. Each ReLU runs in place on its convolution's output and is differentiated from its output alone: the
   gradient passes where r > 0. What is kept for backward is x and the two ReLU outputs r1, r2 (which the next
   convolutions need for their weight gradients anyway), no ActNorm input, no padded copy (revglow.ops.conv_same
   adds the last layer's border term to its narrow output instead of concatenating a border channel to r2).
3. Backward, layer by layer from the top, no wide tensor is allocated that an old one could hold: a ReLU
   output is read for its weight gradient, then overwritten by the gradient it gates, a slice (a quarter) at a
   time: each slice's input gradient goes through a buffer and ReLU's own backward (threshold_backward, one
   fused pass) writes it, zeroed where r <= 0, over that slice of r.
       g3 = dL/dout                     dw3' = corr(g3, r2)      r2 <- (r2 > 0) * convT(g3, w3'), =: g2
       g2                               dw2' = corr(g2, r1)      r1 <- (r1 > 0) * convT(g2, w2'), =: g1, free g2
       g1                               dw1', dL/dx from g1 and x
   Alive at once: at most two wide tensors and a quarter of one (r1, g2, a slice), against about five under
   autograd. (A boolean mask of r would do as well for memory, but masked_fill_ and comparisons into bool run
   about ten times slower than threshold_backward on the CPU: at 32x32 they made a training step 20% slower.)

Early freeing needs the intermediates held by the Function itself rather than by `save_for_backward` (which
keeps them to the end of the backward, and runs them through saved-tensor hooks such as
torch.utils.checkpoint's). So it is asked for with `release=True` by a caller that runs one backward through the
output right away (the reversible engine's recomputation); otherwise the Function saves r1 and r2 normally and
never writes them. A second backward (retain_graph) after a release recomputes what the first one overwrote, and a
double backward (create_graph) differentiates the reference instead.

The wide tensors may be stored channels_last (`memory_format`, `resolve_memory_format`): the input is copied to
channels_last (it is narrow: half the flow's channels), the convolutions and ReLUs then run in that layout, the 1x1
layer and its gradients as plain matrix products over the pixels ([N * H * W, C] @ [C, O]), r1 and r2 are kept in
it, and the output (narrow too) goes back to contiguous NCHW for the flow's elementwise ops. The numbers are the
same; time and oneDNN's working buffers are not (see "auto" below).

Under autocast the op keeps its memory saving in the autocast dtype: the weights are folded in float32, then the
input and the folded weights are cast to that dtype and the three convolutions run there with autocast off (what
autocast would run them in), so what the Function keeps for backward (x, r1, r2) is low precision too: half of
float32's. The output is in the autocast dtype, as an autocast convolution's; the cast's backward brings the
gradients of x and of the float32 weights back to float32.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from revglow.ops.conv_same import (conv1x1, conv2d_same, conv2d_same_backward, conv2d_same_input_grad,
                                   stored_channels_last)

__all__ = ["coupling_network", "coupling_network_reference", "fold_scale_shift", "MEMORY_FORMATS",
           "resolve_memory_format"]

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")

Tensor = torch.Tensor


def _scale_shift(h, scale, shift):
    return h if scale is None else h * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def coupling_network_reference(x, w_in, b_in, s_in, t_in, w_hidden, b_hidden, s_hidden, t_hidden, w_out, b_out,
                               s_out, edge_padding):
    """CouplingNetwork's computation as a pure function of its weights (what torch.compile compiles once for
    every step of a level). b_*: convolution biases (None with ActNorm); s_*, t_*: ActNorm scale and bias (None
    without); s_out: the last layer's output scale exp(f * logs) (None without a log-scale factor)."""
    h = F.relu(_scale_shift(conv2d_same(x, w_in, b_in, edge_padding), s_in, t_in))
    h = F.relu(_scale_shift(F.conv2d(h, w_hidden, b_hidden), s_hidden, t_hidden))
    out = conv2d_same(h, w_out, b_out, edge_padding)
    return out if s_out is None else out * s_out.view(1, -1, 1, 1)


def fold_scale_shift(weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor]):
    """(w', b') with conv(x, w', b') = scale * conv(x, weight, bias) + shift per output channel; scale and shift
    may be None (1 and 0), bias too (0); b' is None when both bias and shift are."""
    if scale is None:
        folded_bias = bias if shift is None else (shift if bias is None else bias + shift)
        return weight, folded_bias
    folded_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    folded_bias = None if bias is None else bias * scale
    if shift is not None:
        folded_bias = shift if folded_bias is None else folded_bias + shift
    return folded_weight, folded_bias


def _hidden(x, w1, b1, w2, b2, edge_padding):
    """r1, r2: each ReLU in place on its convolution's fresh output."""
    r1 = conv2d_same(x, w1, b1, edge_padding).relu_()
    r2 = conv1x1(r1, w2, b2).relu_()
    return r1, r2


def _in_layout(x: Tensor, layout: torch.memory_format) -> Tensor:
    """x as the convolutions read it: as it is for plain NCHW (a strided view too), else a channels_last copy."""
    return x if layout == torch.contiguous_format else x.contiguous(memory_format=layout)


def fold_weights(w_in, b_in, s_in, t_in, w_hidden, b_hidden, s_hidden, t_hidden, w_out, b_out, s_out):
    """(w1, b1, w2, b2, w3, b3): `coupling_network`'s weight arguments with each layer's scale and shift folded
    into its convolution (`fold_scale_shift`)."""
    return (*fold_scale_shift(w_in, b_in, s_in, t_in), *fold_scale_shift(w_hidden, b_hidden, s_hidden, t_hidden),
            *fold_scale_shift(w_out, b_out, s_out, None))


def hidden_and_output(x, w1, b1, w2, b2, w3, b3, edge_padding, layout):
    """(x in `layout`, r1, r2, out): the forward keeping what its backward reads (`backward_from_hidden`); out
    contiguous NCHW (narrow: the flow's ops expect it)."""
    x = _in_layout(x, layout)
    r1, r2 = _hidden(x, w1, b1, w2, b2, edge_padding)
    return x, r1, r2, conv2d_same(r2, w3, b3, edge_padding).contiguous()


def _forward(x, w1, b1, w2, b2, w3, b3, edge_padding, layout):
    # Not hidden_and_output: r1 is dropped before the last convolution, which lowers the no-grad forward's peak.
    r1, r2 = _hidden(_in_layout(x, layout), w1, b1, w2, b2, edge_padding)
    del r1
    return conv2d_same(r2, w3, b3, edge_padding).contiguous()


def _folded_reference(x, w1, b1, w2, b2, w3, b3, edge_padding):
    """The Function's map in differentiable PyTorch (its double backward differentiates this)."""
    h = F.relu(conv2d_same(x, w1, b1, edge_padding))
    h = F.relu(F.conv2d(h, w2, b2))
    return conv2d_same(h, w3, b3, edge_padding)


# The gradient written over a ReLU output goes through a buffer of at most a quarter of it (or of this many bytes,
# whichever is more: below it a single piece costs fewer calls and its memory does not matter). Each piece costs
# its own convolution-backward call: at 256 KiB a 32x32 step (hidden tensors of 2 MiB) ran 4 pieces per ReLU and
# its reversible backward took about 8% longer than with one.
_PIECE_BYTES = 4 * 1024 * 1024
_PIECES = 4


def _pieces(hidden: Tensor) -> Tuple[int, int]:
    """(dim, length): the slices of `hidden` along the batch (dim 0) when it has enough samples, else along its
    channels (dim 1), that `_relu_input_grad` computes one at a time."""
    size = hidden.numel() * hidden.element_size()
    count = max(1, min(_PIECES, -(-size // _PIECE_BYTES)))
    dim = 0 if hidden.shape[0] >= count else 1
    return dim, -(-hidden.shape[dim] // count)


def _stand_in(hidden: Tensor, shape) -> Optional[Tensor]:
    """hidden's first elements as a tensor of `shape` stored as hidden is (plain or channels_last), to stand for a
    slice's input in `conv2d_same_input_grad` (never read); None for a hidden stored otherwise."""
    count = torch.Size(shape).numel()
    if hidden.is_contiguous():
        return hidden.view(-1)[:count].view(shape)
    if not stored_channels_last(hidden):
        return None
    n, c, h, w = shape
    return hidden.permute(0, 2, 3, 1).view(-1)[:count].view(n, h, w, c).permute(0, 3, 1, 2)


def _relu_input_grad(grad: Tensor, hidden: Tensor, weight: Tensor, owned: bool) -> Tensor:
    """dL/dpre for hidden = relu(pre) read by out = conv2d_same(hidden, weight, ...), given grad = dL/dout: the
    convolution's input gradient, zero where hidden <= 0 (threshold_backward, ReLU's own backward, in place).

    `owned`: hidden is no longer needed but for its sign, so the gradient is written over it, a slice at a time
    (`_pieces`: each slice's input gradient reads only its slice of hidden and, along the batch, of grad), and no
    third wide tensor is alive: a ReLU output, the gradient of the layer above and one slice of the new gradient.
    Otherwise (hidden saved for a later backward) the gradient is a new tensor."""
    if not owned:
        out = conv2d_same_input_grad(grad, hidden, weight)
        return torch.ops.aten.threshold_backward.grad_input(out, hidden, 0, grad_input=out)
    dim, length = _pieces(hidden)
    for start in range(0, hidden.shape[dim], length):
        part = hidden.narrow(dim, start, min(length, hidden.shape[dim] - start))
        if dim == 0:
            piece = conv2d_same_input_grad(grad.narrow(0, start, part.shape[0]), part, weight)
        else:   # the input's stand-in: storage of hidden's, of the slice's shape and hidden's layout (never read)
            stand_in = _stand_in(hidden, part.shape)
            piece = conv2d_same_input_grad(grad, part if stand_in is None else stand_in, weight,
                                           slice(start, start + part.shape[1]))
        torch.ops.aten.threshold_backward.grad_input(piece, part, 0, grad_input=part)
        del piece
    return hidden


def backward_from_hidden(grad_out: Tensor, x: Tensor, weights: Tuple[Optional[Tensor], ...], hidden: List[Tensor],
                         owned: bool, needs: Sequence[bool], edge_padding: bool, layout: torch.memory_format
                         ) -> Tuple[Optional[Tensor], ...]:
    """(dL/dx, dL/dw1, dL/db1, dL/dw2, dL/db2, dL/dw3, dL/db3) of the folded network from dL/dout, its input x (in
    `layout`) and its ReLU outputs `hidden` = [r1, r2] (see the module docstring); `needs[i]`: whether the i-th of
    those is wanted (None where not). `owned`: r1 and r2 are no longer needed, and the gradients are written over
    them. The list is emptied: with no other reference to them, each is freed as soon as the backward is done
    with it."""
    w1, b1, w2, b2, w3, b3 = weights
    r1, r2 = hidden
    hidden.clear()
    grad_out = grad_out.contiguous(memory_format=layout)

    # last layer: weight gradient from r2; then dL/d(conv_hidden output), written over r2 when it is ours
    _, grad_w3 = conv2d_same_backward(grad_out, r2, w3, edge_padding, input_grad=False, weight_grad=needs[5])
    grad_b3 = grad_out.sum((0, 2, 3)) if needs[6] else None
    grad = _relu_input_grad(grad_out, r2, w3, owned)
    del r2
    # hidden 1x1 layer: weight gradient from r1; then dL/d(conv_in output), written over r1 when it is ours
    grad_w2 = conv2d_same_backward(grad, r1, w2, False, input_grad=False, weight_grad=True)[1] if needs[3] \
        else None
    grad_b2 = grad.sum((0, 2, 3)) if needs[4] else None
    grad_r1 = _relu_input_grad(grad, r1, w2, owned)
    del grad, r1
    # first layer
    grad_b1 = grad_r1.sum((0, 2, 3)) if needs[2] else None
    grad_x, grad_w1 = conv2d_same_backward(grad_r1, x, w1, edge_padding, input_grad=needs[0],
                                           weight_grad=needs[1])
    if grad_x is not None and layout != torch.contiguous_format:
        grad_x = grad_x.contiguous()   # narrow, and back to the flow's NCHW
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, grad_b3


class _CouplingNetworkFunction(torch.autograd.Function):
    """Inputs (x, w1, b1, w2, b2, w3, b3, edge_padding, release, layout), the weights folded (see the module
    docstring); output the network's output, contiguous NCHW. `layout` (torch.contiguous_format or
    torch.channels_last): how the wide tensors are stored, what is kept of them for backward included; x is kept
    as it came (narrow: its channels_last copy is made again in backward)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3, edge_padding, release, layout):
        _, r1, r2, out = hidden_and_output(x, w1, b1, w2, b2, w3, b3, edge_padding, layout)
        ctx.edge_padding, ctx.layout = edge_padding, layout
        ctx.has_bias = (b1 is not None, b2 is not None, b3 is not None)
        ctx.hidden = None
        ctx.saves_hidden = not release
        if release:
            ctx.hidden = [r1, r2]   # held here so that backward can drop each as soon as it is used
            ctx.save_for_backward(x, w1, b1, w2, b2, w3, b3)
        else:
            ctx.save_for_backward(x, w1, b1, w2, b2, w3, b3, r1, r2)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Its inputs come in the dtype to compute in (see coupling_network): an enclosing autocast, which the
        # reversible engine replays around its backward, must not cast them again.
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return _CouplingNetworkFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        saved = ctx.saved_tensors   # once: torch.utils.checkpoint allows one unpack
        x, w1, b1, w2, b2, w3, b3 = saved[:7]
        edge_padding = ctx.edge_padding
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():   # create_graph: differentiate the plain composition, which autograd can
            inputs = [t for t, need in zip((x, w1, b1, w2, b2, w3, b3), needs) if need]
            with torch.enable_grad():
                out = _folded_reference(x, w1, b1, w2, b2, w3, b3, edge_padding)
            grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True, allow_unused=True))
            return tuple(next(grads) if need else None for need in needs[:7]) + (None, None, None)

        # `hidden` is the only reference this frame holds to r1 and r2: backward_from_hidden empties it, so that
        # each is freed as soon as it is used
        hidden = None
        if ctx.saves_hidden:   # saved tensors: read, never written (a second backward reads them again)
            hidden, owned = list(saved[7:]), False
        elif ctx.hidden is not None:
            hidden, ctx.hidden, owned = ctx.hidden, None, True
        x = _in_layout(x, ctx.layout)
        if hidden is None:   # a second backward through the same graph (retain_graph): the first one overwrote them
            with torch.no_grad():
                hidden, owned = list(_hidden(x, w1, b1, w2, b2, edge_padding)), True
        grads = backward_from_hidden(grad_out, x, (w1, b1, w2, b2, w3, b3), hidden, owned, needs, edge_padding,
                                     ctx.layout)
        return grads + (None, None, None)


# What "auto" picks, from measurements on the CPU (2 shared cores, torch 2.13 with oneDNN; the op's forward +
# backward with release=True, channels_last / contiguous time per interleaved round, medians and ranges over 15-31
# rounds, 1 and 2 threads; /tmp scripts, then benchmarks/memory_format.py). channels_last wins where the hidden
# tensors are large against the 3x3 weights: 0.74-0.84 at 128x128 (6 -> 512 -> 12, batch 1), 0.73-0.97 at 8x8 to
# 32x32 (6 -> 128 -> 12, batch 16), 0.85-0.94 at 64x64 (24 -> 512 -> 48), 0.91-0.99 at 32x32 (96 -> 512 -> 192:
# hidden tensor 0.4 of the weights); about even at 0.2-0.4 (0.98-1.03); it loses where the weights dominate:
# 1.04-1.16 at 8x8 and 16x16 with 24 to 192 channels in (0.05-0.2), 1.2-1.5 at the 256x256 model's deepest levels
# (16x16 to 4x4, 384 to 1536 channels in, one thread). Why: in channels_last oneDNN takes the weight in channels_last
# too, so each call reorders the folded 3x3 weights and their gradients (three weight-sized copies per call in the
# profile), a cost in the weights' size against a gain in the activations'. Hence channels_last where the hidden
# tensor holds at least a quarter as many elements as the two 3x3 weights together: in the 256x256 model (width
# 512, batch 1) its first three levels, 128x128 to 32x32, where the step's peak is; in the 32x32 model (width 128,
# batch 16) its first two. On CUDA channels_last throughout (cuDNN's preferred layout; not measured here: no GPU).
_AUTO_HIDDEN_OVER_WEIGHTS = 0.25


def resolve_memory_format(choice: str, x: Tensor, w_in: Tensor, w_out: Tensor) -> torch.memory_format:
    """The layout the network's convolutions run in for an input x [N, C, H, W] and the 3x3 weights w_in
    [hidden, C (+ 1), 3, 3] and w_out: "contiguous" (plain NCHW), "channels_last", or "auto": channels_last on
    CUDA, and on the CPU where the hidden tensor is large against the weights (see above). Both are exact."""
    if choice not in MEMORY_FORMATS:
        raise ValueError(f"memory_format={choice!r} is not a known option; choose one of {MEMORY_FORMATS}")
    if choice == "auto":
        n, _, h, w = x.shape
        large = n * h * w * w_in.shape[0] >= _AUTO_HIDDEN_OVER_WEIGHTS * (w_in.numel() + w_out.numel())
        choice = "channels_last" if x.device.type == "cuda" or large else "contiguous"
    return torch.channels_last if choice == "channels_last" else torch.contiguous_format


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a convolution of x in, or None when it would leave x as it is (autocast off on
    x's device, or x not a float32 / low-precision tensor: autocast leaves float64 alone)."""
    if not torch.is_autocast_enabled(x.device.type) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return torch.get_autocast_dtype(x.device.type)


def coupling_network(x, w_in, b_in, s_in, t_in, w_hidden, b_hidden, s_hidden, t_hidden, w_out, b_out, s_out,
                     edge_padding, release: bool = False, memory_format: str = "auto"):
    """`coupling_network_reference`'s map, through the memory-lean Function (see the module docstring); same
    arguments. `release=True`: the caller runs exactly one backward through the output, right away (the wide
    intermediates are then freed as that backward uses them, and bypass saved-tensor hooks). Under autocast the
    convolutions run in the autocast dtype, and so does what is kept for backward; the output is in that dtype.
    `memory_format` (MEMORY_FORMATS, see `resolve_memory_format`): how the convolutions store the wide tensors;
    x and the output are NCHW either way."""
    tensors = (x, *fold_weights(w_in, b_in, s_in, t_in, w_hidden, b_hidden, s_hidden, t_hidden, w_out, b_out, s_out))
    layout = resolve_memory_format(memory_format, x, w_in, w_out)
    low = _autocast_dtype(x)
    if low is None:
        return _lean(tensors, edge_padding, release, layout)
    tensors = tuple(None if t is None else t.to(low) for t in tensors)   # differentiable casts
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _lean(tensors, edge_padding, release, layout)


def _lean(tensors: Tuple[Optional[Tensor], ...], edge_padding: bool, release: bool,
          layout: torch.memory_format) -> Tensor:
    """(x, w1, b1, w2, b2, w3, b3) through the lean Function, or its plain forward when no graph is needed."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return _forward(*tensors, edge_padding, layout)
    return _CouplingNetworkFunction.apply(*tensors, bool(edge_padding), bool(release), layout)
