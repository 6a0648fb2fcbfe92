"""Quantized frozen linear layers for QLoRA, from scratch.

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), §3:
the frozen base weight is stored in 4 bits and dequantized on the fly; only the
LoRA path (full precision) is trained, and gradients flow through the
dequantized weight into the adapters:

    Y = X · doubleDequant(c1, c2, W_NF4) + scale · X A B         (QLoRA eq. 5)

- **4-bit NormalFloat (NF4)**: 16 levels at quantiles of N(0, 1), normalised to
  [-1, 1], with an exact zero. A weight is cut into blocks of 64 (row-major);
  each block is divided by its absolute maximum c and every value is replaced
  by the index of the nearest level. Two 4-bit indices share one byte.
- **Double quantization**: the per-block constants c (float32, 0.5 bits per
  weight) are quantized again in blocks of 256, after subtracting their mean;
  32/64 bits per weight become 8/64 + 32/(64·256), ≈ 4.127 bits in all. The
  paper uses an 8-bit float for this second level; we reuse the int8 absmax
  code below, which at the same 8 bits bounds the error on the centred
  constants by absmax/254.
- **int8**: absmax quantization per output channel (one scale per row), the
  8-bit base QLoRA compares against (LLM.int8() without its outlier split).

Only ``nn.Linear`` layers are quantized, and never ``lm_head`` by default: its
errors land directly on the logits, and in GPT-2 it shares its weight with the
token embedding (a lookup table, not a matmul), so quantizing it would untie the
two and store the embedding twice. QLoRA and bitsandbytes keep it in full
precision too.

This module depends on torch only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from loralab.surgery import replace_module, tied_weights

METHODS = ("none", "int8", "nf4")
NF4_BLOCK = 64  # weights per absmax constant (QLoRA §3)
DOUBLE_QUANT_BLOCK = 256  # constants per second-level constant (QLoRA §3, Double Quantization)
SKIP = ("lm_head",)

# The 16 NF4 levels, as published in bitsandbytes (functional.create_normal_map, backends/utils.py):
# norm.ppf of 8 evenly spaced quantiles in [0.5, 0.9677083] on the positive side, 7 on the negative
# side, and an exact 0, normalised by the largest. Index i is the 4-bit code i.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"quantize={method!r} is invalid: expected one of {list(METHODS)}")


# ---------------------------------------------------------------------------
# Codes


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(2n,) uint8 codes in [0, 16) -> (n,) bytes, the first code in the high nibble (as bitsandbytes)."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n,) bytes -> (2n,) uint8 codes: the inverse of ``pack_nibbles``."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten()


def quantize_absmax_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row: x (rows, n) -> codes int8 (rows, n), scale float32 (rows,).

    x ≈ codes · scale with scale = absmax(row) / 127, error at most scale / 2.
    """
    scale = x.float().abs().amax(dim=1) / 127  # (rows,)
    codes = torch.round(x.float() / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None])
    return codes.clamp(-127, 127).to(torch.int8), scale


def dequantize_absmax_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]  # (rows, n)


def quantize_nf4(weight: torch.Tensor, block_size: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax NF4 (QLoRA §3): weight -> packed codes uint8 (n_blocks·block_size/2,),
    absmax float32 (n_blocks,). The flattened weight is zero-padded to whole blocks; zeros
    change no block's absmax and decode to the exact level 0."""
    flat = weight.detach().float().flatten()
    flat = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)  # (n_blocks, block)
    absmax = flat.abs().amax(dim=1)  # (n_blocks,)
    normed = flat / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    levels = torch.tensor(NF4_LEVELS, device=flat.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = how many midpoints lie below
    codes = torch.bucketize(normed.flatten(), midpoints, out_int32=True).to(torch.uint8)
    return pack_nibbles(codes), absmax


def nf4_byte_table(device=None) -> torch.Tensor:
    """(256, 2): the two NF4 levels that each byte value encodes, high nibble first."""
    levels = torch.tensor(NF4_LEVELS, device=device)
    return levels[unpack_nibbles(torch.arange(256, dtype=torch.uint8, device=device)).long()].view(256, 2)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
                   byte_table: torch.Tensor) -> torch.Tensor:
    """The inverse of ``quantize_nf4`` up to rounding: float32 of ``shape``. Looking up whole
    bytes (int32 indices) keeps the transient index tensor at a quarter of the weight's size."""
    values = byte_table.index_select(0, packed.int()).view(absmax.numel(), -1)  # (n_blocks, block)
    return (values * absmax[:, None]).flatten()[:shape.numel()].view(shape)


def double_quantize(absmax: torch.Tensor, block_size: int = DOUBLE_QUANT_BLOCK):
    """Quantize the block constants again (QLoRA §3, Double Quantization): subtract their mean
    (they are all positive), then int8 absmax in blocks of ``block_size``.
    Returns codes int8 (n,), scales float32 (ceil(n / block_size),), mean float32 ()."""
    mean = absmax.mean()
    centred = F.pad(absmax - mean, (0, -absmax.numel() % block_size)).view(-1, block_size)
    codes, scale = quantize_absmax_int8(centred)
    return codes.flatten()[:absmax.numel()], scale, mean


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                      block_size: int = DOUBLE_QUANT_BLOCK) -> torch.Tensor:
    return codes.float() * scale.repeat_interleave(block_size)[:codes.numel()] + mean  # (n,)


# ---------------------------------------------------------------------------
# The layer


class _DequantizedLinear(torch.autograd.Function):
    """x Wᵀ with W dequantized in the forward and again in the backward, so autograd keeps
    the packed codes, never the float weight (QLoRA computes dX the same way)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.dequantize_weight(grad_out.dtype), None  # (..., in)


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is kept only in packed form (``int8`` or ``nf4``).

    The float weight is gone once built: the buffers below are all the layer stores
    (plus the float bias). The forward dequantizes the weight into the activations'
    dtype and computes ``x Wᵀ + b``.
    """

    def __init__(self, linear: nn.Linear, method: str = "nf4", block_size: int = NF4_BLOCK,
                 double_quant: bool = True):
        super().__init__()
        if method not in METHODS[1:]:
            raise ValueError(f"QuantizedLinear method={method!r} is invalid: expected one of {list(METHODS[1:])}")
        if not (isinstance(block_size, int) and block_size > 0 and block_size % 2 == 0):
            raise ValueError(f"QuantizedLinear block_size={block_size!r} is invalid: expected a positive even integer")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.method, self.block_size, self.double_quant = method, block_size, double_quant
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False) if linear.bias is not None else None
        weight = linear.weight.detach()
        if method == "int8":
            codes, scale = quantize_absmax_int8(weight)
            self.register_buffer("weight_int8", codes)  # (out, in)
            self.register_buffer("weight_scale", scale)  # (out,)
            return
        packed, absmax = quantize_nf4(weight, block_size)
        self.register_buffer("weight_packed", packed)  # (n_blocks · block_size / 2,)
        self.register_buffer("byte_table", nf4_byte_table(weight.device), persistent=False)
        if double_quant:
            absmax_codes, absmax_scale, absmax_mean = double_quantize(absmax)
            self.register_buffer("absmax_int8", absmax_codes)  # (n_blocks,)
            self.register_buffer("absmax_scale", absmax_scale)  # (n_blocks / 256,)
            self.register_buffer("absmax_mean", absmax_mean)  # ()
        else:
            self.register_buffer("absmax", absmax)  # (n_blocks,)

    def block_absmax(self) -> torch.Tensor:
        """The NF4 block constants c, after their own dequantization when double-quantized."""
        if self.double_quant:
            return double_dequantize(self.absmax_int8, self.absmax_scale, self.absmax_mean)
        return self.absmax

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, (out, in), in ``dtype``."""
        if self.method == "int8":
            return dequantize_absmax_int8(self.weight_int8, self.weight_scale).to(dtype)
        shape = torch.Size((self.out_features, self.in_features))
        return dequantize_nf4(self.weight_packed, self.block_absmax(), shape, self.byte_table).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedLinear.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """A frozen float32 ``nn.Linear`` holding the dequantized weight (for merging and export)."""
        linear = nn.Linear(self.in_features, self.out_features, device="meta")  # both replaced below
        linear.weight, linear.bias = nn.Parameter(self.dequantize_weight(), requires_grad=False), self.bias
        return linear

    def weight_bytes(self) -> int:
        """Bytes that store the weight: codes and every constant (the bias is not counted)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "byte_table")

    def extra_repr(self) -> str:
        extra = f", block_size={self.block_size}, double_quant={self.double_quant}" if self.method == "nf4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.method}{extra}")


# ---------------------------------------------------------------------------
# Model-level API


def quantize_linears(model: nn.Module, method: str, skip: tuple[str, ...] = SKIP, block_size: int = NF4_BLOCK,
                     double_quant: bool = True) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (except leaf names in ``skip``) by a frozen
    ``QuantizedLinear``, in place; ``method="none"`` changes nothing. Returns the names replaced.

    Raises before changing anything if a selected weight is tied to another module."""
    check_method(method)
    if method == "none":
        return []
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in skip]
    for name, tied in tied_weights(model, names).items():
        # the other module would keep the float copy: nothing saved, and the two would differ
        raise ValueError(f"cannot quantize {name!r}: its weight is tied to {tied} (add it to skip)")
    for name in names:
        replace_module(model, name, QuantizedLinear(model.get_submodule(name), method, block_size, double_quant))
    return names


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantization(model: nn.Module) -> str:
    """How ``model``'s Linears are stored: ``"none"``, a method, or several joined by ``+``."""
    return "+".join(sorted({m.method for m in quantized_layers(model).values()})) or "none"


def bits_per_parameter(model: nn.Module) -> float:
    """Bits of storage per quantized weight, over all ``QuantizedLinear`` layers, measured
    from their buffers' bytes: 8.03 for int8 (out×in), 4.5 for NF4, 4.127 with double quant."""
    layers = quantized_layers(model).values()
    weights = sum(m.in_features * m.out_features for m in layers)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no QuantizedLinear layers")
    return 8 * sum(m.weight_bytes() for m in layers) / weights
