"""Weight formats: quantize float weights, dequantize for reference, map GGUF blocks.

A ``Packed`` weight is a 2-D [out, in] matrix in one of four layouts (the first three are
rung/native/kernels.c's):

- ``f32``: float32 as is.
- ``q8``: int8 values, one float16 scale per group along ``in``: w = scale * q. Symmetric,
  q in [-127, 127]. ``group == in`` is per-channel (one scale per output row).
- ``q4``: 4-bit values two per byte, float16 scale and offset per group: w = scale * q + offset,
  q in [0, 15]. Each run of 32 values is 16 bytes, byte j = value j | value j + 16 << 4: GGUF's
  Q4_0 / Q4_1 block layout, so those blocks map byte for byte (Q4_0's w = d * (q - 8) is
  scale d, offset -8d).
- ``f8``: float8 e4m3 values, one float32 scale per output row (``group == in``): w = scale * q,
  the scale chosen per row by a search over one octave above max|w| / 448 (see SCALE_STEPS).
  Hopper's ``torch._scaled_mm`` takes these bytes and scales as they are
  (rung/kernels/triton_fp8.py); the CPU dequantizes them (this file).

Dequantization is the reference every kernel is tested against.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch

FORMATS = ("f32", "q8", "q4", "f8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value


@dataclass
class Packed:
    fmt: str
    data: torch.Tensor  # f32 [N, K] | int8 [N, K] | uint8 [N, K / 2] | float8_e4m3fn [N, K]
    shape: tuple[int, int]  # (out, in)
    group: int | None = None
    scale: torch.Tensor | None = None  # float16 [N, K / group] (float32 [N, 1] for f8)
    offset: torch.Tensor | None = None  # float16 [N, K / group] (q4)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.offset) if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def rows(self, index: torch.Tensor) -> "Packed":
        """The packed rows ``index`` (an embedding lookup reads a few rows of the table)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Packed(self.fmt, self.data[index], (len(index), self.shape[1]), self.group,
                      pick(self.scale), pick(self.offset))

    def permute_rows(self, order: torch.Tensor) -> "Packed":
        """Rows reordered (fused projections interleave gate and up rows; GGUF's Q/K unpermute)."""
        p = self.rows(order)
        p.shape = self.shape
        return p


def cat_rows(parts: list[Packed]) -> Packed:
    """Packed matrices of one format and group stacked along the output rows (a fused q|k|v or gate|up)."""
    first = parts[0]
    kind = lambda p: (p.fmt, p.group, p.shape[1], p.offset is None)  # noqa: E731
    if any(kind(p) != kind(first) for p in parts):
        raise ValueError("cat_rows: the parts differ in format, group, width or offsets")
    cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return Packed(first.fmt, cat("data"), (sum(p.shape[0] for p in parts), first.shape[1]), first.group,
                  cat("scale"), cat("offset"))


def fits(fmt: str, in_features: int, group: int | None) -> bool:
    """Whether a matrix with ``in_features`` inputs can be stored in ``fmt`` with ``group`` (None:
    the format's default): whole runs of 32 and a group that divides the row (pack_model's and
    pack_experts' rule; a matrix that does not fit stays as it is)."""
    if fmt == "f32":
        return True
    g = group or (32 if fmt == "q4" else in_features)
    return in_features % 32 == 0 and in_features % g == 0 and g % 32 == 0


def check_group(fmt: str, in_features: int, group: int | None) -> int:
    group = in_features if group is None else group
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or group % 32 or in_features % group:
        raise ValueError(f"{fmt}: group size {group} must be a multiple of 32 dividing the input width {in_features}")
    return group


def packed_tensors(fmt: str, shape: tuple[int, int], group: int | None) -> dict[str, tuple[torch.dtype, tuple]]:
    """The tensors a weight of format ``fmt``, shape (out, in) and ``group`` is made of: part name →
    (dtype, shape). The one statement of each layout: ``check_packed`` holds every PackedLinear
    (whatever made it: quantize, GGUF blocks, a checkpoint) and every layer ``save_packed`` writes
    to it, and ``plan_packed`` checks a packed checkpoint's tensors against it before any kernel
    reads them. ValueError for an unknown format or a group it cannot have."""
    n, k = shape
    if fmt == "f32":
        if group is not None:
            raise ValueError(f"f32: no group size (got {group})")
        return {"data": (torch.float32, (n, k))}
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if group is None:
        raise ValueError(f"{fmt}: needs a group size")
    groups = k // check_group(fmt, k, group)
    if fmt == "f8":
        if group != k:
            raise ValueError(f"f8: one scale per output row (group {k}), got group {group}")
        return {"data": (FP8, (n, k)), "scale": (torch.float32, (n, 1))}
    parts = {"data": (torch.int8, (n, k)) if fmt == "q8" else (torch.uint8, (n, k // 2)),
             "scale": (torch.float16, (n, groups))}
    if fmt == "q4":
        parts["offset"] = (torch.float16, (n, groups))
    return parts


def check_packed(p: "Packed") -> None:
    """ValueError unless ``p``'s tensors are exactly the ones ``packed_tensors`` gives its format:
    a kernel trusts these shapes and reads that many bytes through raw pointers."""
    try:
        n, k = (operator.index(d) for d in p.shape)
    except (TypeError, ValueError):
        n = k = 0
    if n <= 0 or k <= 0:
        raise ValueError(f"{p.fmt}: shape {p.shape} is not a positive (out, in)")
    parts = packed_tensors(p.fmt, (n, k), p.group)
    for name in ("data", "scale", "offset"):
        t = getattr(p, name)
        if name not in parts:
            if t is not None:
                raise ValueError(f"{p.fmt} [{n}, {k}]: has a {name} tensor, which the format has none of")
            continue
        dtype, want = parts[name]
        if t is None or t.dtype != dtype or tuple(t.shape) != want or not t.is_contiguous():
            got = "none" if t is None else f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
            raise ValueError(f"{p.fmt} [{n}, {k}] group {p.group}: {name} is {got}, expected contiguous "
                             f"{str(dtype).removeprefix('torch.')} {list(want)}")


def quantize(weight: torch.Tensor, fmt: str, group: int | None = None,
             gain: torch.Tensor | None = None) -> Packed:
    """weight [N, K] (any float dtype) → Packed. q8 defaults to per-channel, q4 to groups of 32;
    f8 is always per-channel. ``gain`` [K]: the RMSNorm gain the layer's input comes through,
    if any; f8's scale search weighs each input channel's error by its square (fp8_row_scales),
    the other formats ignore it."""
    w = weight.detach().float().contiguous()
    n, k = w.shape
    if fmt == "f32":
        return Packed("f32", w, (n, k))
    if fmt == "q4" and group is None:
        group = 32
    group = check_group(fmt, k, group)
    if fmt == "f8":
        return quantize_fp8(w, group, gain)
    g = w.view(n, k // group, group)
    if fmt == "q8":
        scale = (g.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float16).tiny).half()
        q = torch.round(g / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
        return Packed("q8", q.view(n, k), (n, k), group, scale)
    if fmt == "q4":
        scale, offset = _fit_q4(g)
        q = torch.round((g - offset.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
        return Packed("q4", pack_nibbles(q.view(n, k)), (n, k), group, scale, offset)
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")


def quantize_fp8(w: torch.Tensor, group: int, gain: torch.Tensor | None = None) -> Packed:
    """w [N, K] float32 → f8: per output row, the scale of fp8_row_scales and q = e4m3(w / scale),
    rounded to nearest with saturation at ±448 (a cast alone turns what lies beyond into NaN)."""
    n, k = w.shape
    if group != k:
        raise ValueError(f"f8: one scale per output row (group {k}), got group {group}")
    if not torch.isfinite(w).all():
        raise ValueError(f"f8 [{n}, {k}]: the weight holds NaN or infinite values")
    scale = fp8_row_scales(w, gain=gain)
    q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return Packed("f8", q.contiguous(), (n, k), k, scale.contiguous())


# Scales tried per row: max|w| / 448 times 2 ** (i / SCALE_STEPS), i = 0 .. SCALE_STEPS - 1.
# e4m3's grid is relative (8 steps per power of two), so doubling a scale maps the grid onto itself
# (but for subnormals): one octave of scales holds every alignment of a row's values to the grid,
# and none of them clips (the row's largest |w| lands between 224 and 448). The search keeps the
# alignment with the least squared error; the first candidate is max-abs scaling, so no row ends
# worse than with it. Clipping (24 scales from 0.7 to 1 × max-abs) lowered the error less. On the
# dequantized GGUFs of SmolLM2-135M / Gemma 3 270M, RMS error over the packed layers 2.63% → 2.45%
# / 2.64% → 2.40%; the logits' KL to float32 (benchmarks/ppl_text.txt, the head kept in float)
# 12.7e-3 → 9.6e-3 / 11.7e-3 → 11.3e-3 (docs/quantization.md).
#
# The error that matters is the layer's output's, y = W·(g ⊙ x̂), where a block's RMSNorm hands
# the q|k|v and gate|up projections x̂ of unit RMS times its gain g. With no data to say more, take
# x̂'s channels as alike and uncorrelated: the output's expected squared error is then
# Σ_k g_k² e_k², so that is what the search weighs each weight's error by (``gain``; none for o and
# down, whose inputs no norm scales). Channels with large gains are the ones activations carry.
SCALE_STEPS = 16
CHUNK = 1 << 14  # weights a CPU search step takes (times the candidates: a few MB, in cache)
CHUNK_GPU = 1 << 22
_SPLIT = 2.0 ** 20 + 1  # Veltkamp's splitter: float32's 24 significant bits less e4m3's 4


def fp8_row_scales(w: torch.Tensor, steps: int = SCALE_STEPS, gain: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of w [N, K] (float32), the float32 scale [N, 1] with the least squared e4m3 error
    among ``steps`` candidates (see SCALE_STEPS), each input channel's error weighted by
    ``gain[k]²`` when a gain [K] is given, found a few rows at a time (about CHUNK weights times
    ``steps``): no [N, K] copies. A CUDA weight is searched in torch, on its device; on the CPU in
    NumPy, on one thread (about 20 ns a weight): torch would enter its thread pool at each of these
    small operations, and on a busy 2-core machine its threads waiting on each other made the
    search ten times slower (a pool of NumPy threads was no faster there either)."""
    n, k = w.shape
    base = (w.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)  # max-abs
    ratios = (2.0 ** (torch.arange(steps, dtype=torch.float64) / steps)).float().to(w.device)
    weights = _channel_weights(gain, k, w.device)
    on_cpu = w.device.type == "cpu"
    x, s0, r, h = ((t if t is None else t.detach().numpy()) for t in (w, base, ratios, weights)) if on_cpu \
        else (w, base, ratios, weights)
    rows = max(1, (CHUNK if on_cpu else CHUNK_GPU) // k)
    best = [_best_ratio(x[i:i + rows], s0[i:i + rows], r, h) for i in range(0, n, rows)]
    best = torch.from_numpy(np.concatenate(best)) if on_cpu else torch.cat(best)
    return base * ratios[best, None]


def _channel_weights(gain: torch.Tensor | None, k: int, device) -> torch.Tensor | None:
    """gain [K] → float32 g² scaled to mean 1 (None: every channel alike)."""
    if gain is None:
        return None
    if gain.shape != (k,):
        raise ValueError(f"f8: a gain of shape {tuple(gain.shape)} for a weight of {k} input channels")
    h = gain.detach().float().to(device).square()
    if not torch.isfinite(h).all():
        raise ValueError("f8: the input's gain holds NaN or infinite values")
    mean = h.mean()
    return h / mean if mean > 0 else None


def _best_ratio(part, s0, ratios, weights=None):
    """The index of the best ratio for each row of part [rows, K] (NumPy or torch, float32),
    each channel's squared error times weights [K] if given."""
    y = part / (s0 * ratios[:, None, None])  # [steps, rows, K], |y| <= 448 / ratio: nothing clips
    e = _round_e4m3(y) - y
    e2 = e * e if weights is None else e * e * weights
    err = e2.sum(-1) * (ratios * ratios)[:, None]  # in units of the max-abs scale
    return err.argmin(0)  # the first of equal errors: max-abs


def _round_e4m3(y):
    """y (|y| <= 448, float32) rounded as a cast to e4m3 rounds it, in float32 arithmetic
    (decoding e4m3 bytes to float is several times slower on the CPU): Veltkamp's split
    c - (c - y), c = y * (2^20 + 1), keeps y's 4 leading significant bits, to nearest even: e4m3's
    rounding of its normal values. Below 2^-6 (its subnormals, under 1/28,672 of a row's largest
    value) this keeps more bits than e4m3 does, an error under 2^-20 a value that the search
    leaves out."""
    c = y * _SPLIT
    return c - (c - y)


# 4-bit grids tried per group: the min-max grid and grids of 15 +- STRIDE * (1..ROUNDS) steps over
# the group's range (so the ends clip or overhang by up to half a step each), the levels of each
# refitted by least squares to a scale and offset (llama.cpp's make_qkx search for its K-quants
# works the same way). Letting a group's few outliers clip puts the others on a finer grid. The
# best candidate's squared error is never above the min-max grid's: on Gaussian weights -20%, and
# Gemma 3 270M @int4 from its dequantized GGUF went from +19.7% to +13.0% perplexity (quant.py).
ROUNDS = 4
STRIDE = 0.25


def _fit_q4(g: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of g [..., G, group] (float32): fp16 scale and offset of the 4-bit affine grid with
    the least squared error among the candidates (see ROUNDS). Chunked: a few copies of a chunk of
    groups at a time, not of the whole weight (2 MB chunks on a CPU, 128 MB on a GPU, where each
    chunk's ~100 small kernels would otherwise dominate)."""
    chunk = chunk or (1 << 20 if g.is_cuda else 1 << 14)
    shape = g.shape[:-1]
    flat = g.reshape(-1, g.shape[-1])
    scales, offsets = [], []
    for part in flat.split(chunk):
        s, o = _fit_q4_part(part)
        scales.append(s), offsets.append(o)
    return torch.cat(scales).view(shape), torch.cat(offsets).view(shape)


def _fit_q4_part(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tiny = torch.finfo(torch.float16).tiny
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    span = (hi - lo).clamp_min(tiny)
    n = x.shape[-1]
    best_scale = (span / 15).clamp_min(tiny).half()  # the min-max grid: the fallback and first candidate
    best_offset = lo.half()
    best_err = _q4_error(x, best_scale, best_offset)
    for step in range(-ROUNDS, ROUNDS + 1):
        if step == 0:
            continue
        # levels from a grid of 15 + step / 8 steps over [lo, hi], then scale and offset refitted to them
        levels = torch.round((x - lo) * ((15 + step * STRIDE) / span)).clamp_(0, 15)
        sl, sx = levels.sum(-1, keepdim=True), x.sum(-1, keepdim=True)
        sll, slx = (levels * levels).sum(-1, keepdim=True), (levels * x).sum(-1, keepdim=True)
        det = n * sll - sl * sl
        ok = det > 0
        scale = torch.where(ok, (n * slx - sl * sx) / torch.where(ok, det, 1), span / 15)
        offset = torch.where(ok, (sx - scale * sl) / n, lo)
        scale, offset = scale.clamp_min(tiny).half(), offset.half()
        err = _q4_error(x, scale, offset)
        better = err < best_err
        best_scale, best_offset = torch.where(better, scale, best_scale), torch.where(better, offset, best_offset)
        best_err = torch.minimum(err, best_err)
    return best_scale[..., 0], best_offset[..., 0]


def _q4_error(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Squared error per group of x on the grid scale * q + offset (fp16 values, as stored)."""
    s, o = scale.float(), offset.float()
    q = torch.round((x - o) / s).clamp_(0, 15)
    return ((q * s + o - x) ** 2).sum(-1, keepdim=True)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] → [N, K / 2] bytes, GGUF's order within each run of 32."""
    n, k = q.shape
    runs = q.view(n, k // 32, 2, 16)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    n, half = data.shape
    runs = data.view(n, half // 16, 1, 16)
    return torch.cat((runs & 0x0F, runs >> 4), dim=2).reshape(n, half * 2)


def dequantize(p: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: Packed → [N, K] float."""
    n, k = p.shape
    if p.fmt == "f32":
        return p.data.to(dtype)
    if p.fmt == "f8":
        return p.data.float().mul_(p.scale.float()).to(dtype)
    # scales broadcast over each group (no [N, K] copies of them: prefill dequantizes every layer)
    g = k // p.group
    scale = p.scale.float().view(n, g, 1)
    if p.fmt == "q8":
        return (p.data.view(n, g, p.group).float().mul_(scale)).view(n, k).to(dtype)
    w = unpack_nibbles(p.data).view(n, g, p.group).float().mul_(scale).add_(p.offset.float().view(n, g, 1))
    return w.view(n, k).to(dtype)


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded as the q8 and q4 kernels round it before its integer dot products: int8 in runs of
    32 with scale max|x| / 127 (half to even); returned dequantized, float32. The kernel's result is
    this x through the dequantized weight."""
    m, k = x.shape
    runs = x.float().reshape(m, k // 32, 32)
    d = runs.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(runs * inv) * d).reshape(m, k)


# ---- GGUF blocks, kept as they are ------------------------------------------------------------

GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # per 32 values


def from_gguf_blocks(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> Packed:
    """A GGUF tensor's raw bytes (uint8, its blocks in order) → Packed, no value changed.

    Q8_0: fp16 d, 32 int8 → q8 (group 32). Q4_0: fp16 d, 16 bytes → q4 with offset -8d.
    Q4_1: fp16 d, fp16 m, 16 bytes → q4 with scale d, offset m.
    """
    n, k = shape
    if kind not in GGUF_BLOCK_BYTES or k % 32:
        raise ValueError(f"no packed mapping for GGUF {kind} with row width {k}")
    blocks = torch.from_numpy(np.array(raw, copy=True).reshape(n, k // 32, GGUF_BLOCK_BYTES[kind]))
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [n, k / 32]
    if kind == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return Packed("q8", q, (n, k), 32, d.contiguous())
    if kind == "Q4_0":
        # -8 * d is exact in float16 unless it overflows (|d| > 8188); such a block has no use
        offset = (d.float() * -8).half()
        qs = blocks[..., 2:].reshape(n, k // 2).contiguous()
        return Packed("q4", qs, (n, k), 32, d.contiguous(), offset.contiguous())
    m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0]
    qs = blocks[..., 4:].reshape(n, k // 2).contiguous()
    return Packed("q4", qs, (n, k), 32, d.contiguous(), m.contiguous())
