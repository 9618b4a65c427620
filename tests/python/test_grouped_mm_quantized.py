"""grouped_mm_quantized and quantize_weight: against dequantize() followed by the float reference, every bit width,
group size and symmetry, activations in float32/bfloat16/float16/float64, empty experts, 1 to many rows per expert
(the skinny kernel, AMX for bfloat16 and the dequantized-panel path), the portable kernels, thread-count
independence, opcheck,
gradcheck, TorchScript, torch.compile, torch.export with a dynamic batch, and bad inputs."""
import pytest
import torch

import torchmoe
from torchmoe import _info, reference
from torchmoe.quantization import dequantize_weight

from conftest import DEVICES, outputs_of_both_walks, run_python

# (bits, group_size, symmetric)
FORMATS = [(8, 128, True), (4, 128, True), (4, 128, False), (4, 64, True), (4, 32, False), (4, 2, True)]
FORMAT_IDS = [f"int{b}-g{g}-{'sym' if s else 'asym'}" for b, g, s in FORMATS]


def make(counts, d_in, d_out, bits, group_size, symmetric, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts, dtype=torch.long)
    x = torch.randn(int(counts.sum()), d_in, generator=g).to(dtype)
    w = torch.randn(len(counts), d_in, d_out, generator=g) + 0.3 * torch.rand(len(counts), 1, d_out, generator=g)
    group_size = min(group_size, d_in)
    return x, torchmoe.quantize_weight(w, bits, group_size, symmetric), counts, w


def expected(x, qw, counts):
    # the float reference on the dequantized weight, in float64
    return reference.grouped_mm(x.double(), qw.dequantize(torch.float64), counts)


def check_close(out, ref, dtype):
    tol = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert out.shape == ref.shape
    if out.numel() == 0:
        return
    scale = ref.abs().max().clamp(min=1.0)
    err = (out.double() - ref).abs().max() / scale
    assert err <= tol, f"max error {float(err):.3g} relative to the largest output, dtype {dtype}"


# --- quantize_weight ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS, ids=FORMAT_IDS)
def test_quantize_dequantize_error_is_at_most_half_a_step(bits, group_size, symmetric):
    _, qw, _, w = make([1, 1, 1], 256, 40, bits, group_size, symmetric)
    assert qw.shape == (3, 256, 40) and qw.bits == bits
    step = qw.scales.repeat_interleave(qw.group_size, dim=1)  # [E, d_in, d_out]
    err = (qw.dequantize() - w).abs()
    assert torch.all(err <= 0.5 * step * (1 + 1e-5) + 1e-7), float((err / step).max())
    if bits == 4:
        assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (3, 128, 40)
        assert qw.scales.shape == (3, 256 // group_size, 40)
        assert (qw.zeros is None) == symmetric
    else:
        assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (3, 1, 40) and qw.group_size == 256


def test_quantize_is_deterministic_and_keeps_zero_exact():
    w = torch.randn(2, 64, 16)
    w[:, :32] = 0.0  # an all-zero group
    w[0, 40, 3] = 0.0
    for bits, gs, sym in FORMATS[:5]:
        a, b = torchmoe.quantize_weight(w, bits, gs if gs <= 64 else 32, sym), torchmoe.quantize_weight(w, bits, 32, sym)
        if bits == 4:
            assert torch.equal(torchmoe.quantize_weight(w, bits, 32, sym).qweight, b.qweight)
        deq = b.dequantize()
        assert torch.all(deq[:, :32] == 0) and deq[0, 40, 3] == 0
        assert torch.equal(a.dequantize(), torchmoe.quantize_weight(w, bits, gs if gs <= 64 else 32, sym).dequantize())


def test_quantize_keeps_dtype_and_packing_layout():
    w = torch.randn(1, 4, 3, dtype=torch.bfloat16)
    qw = torchmoe.quantize_weight(w, 4, group_size=4, symmetric=False)
    assert qw.dequantize().dtype == torch.bfloat16 and qw.dtype == torch.bfloat16
    # low nibble = even reduction row, high nibble = odd row
    deq = qw.dequantize(torch.float32)
    low, high = (qw.qweight & 15).float(), (qw.qweight >> 4).float()
    z, s = qw.zeros.float(), qw.scales
    torch.testing.assert_close(deq[0, 0], (s[0, 0] * (low[0, 0] - z[0, 0])), rtol=0, atol=0)
    torch.testing.assert_close(deq[0, 1], (s[0, 0] * (high[0, 0] - z[0, 0])), rtol=0, atol=0)
    assert "bits=4" in repr(qw) and qw.nbytes == 2 * 3 + 3 * 4 + 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits"),
    (dict(bits=4, group_size=48), "group_size"),
    (dict(bits=4, group_size=7), "group_size"),
    (dict(bits=8, symmetric=False), "symmetric"),
])
def test_quantize_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torchmoe.quantize_weight(torch.randn(2, 64, 8), **kwargs)
    with pytest.raises(ValueError, match="weight"):
        torchmoe.quantize_weight(torch.randn(64, 8), 8)


# --- the op against the reference ---------------------------------------------------------------------------------

COUNTS = [
    [1],
    [0, 0, 0],
    [3, 0, 4],
    [1, 1, 1, 1, 1, 1, 1, 1],
    [16, 0, 17, 2],
    [32, 33, 0, 5],
    [300, 0, 1, 64],
]


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("counts", COUNTS, ids=str)
def test_matches_dequantized_reference(bits, group_size, symmetric, counts):
    x, qw, c, _ = make(counts, 128, 72, bits, group_size, symmetric)
    out = torchmoe.grouped_mm_quantized(x, qw, c)
    assert out.shape == (x.shape[0], 72) and out.dtype == x.dtype
    check_close(out, expected(x, qw, c), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS[:3], ids=FORMAT_IDS[:3])
def test_activation_dtypes(dtype, bits, group_size, symmetric):
    for counts in ([2, 0, 5], [40, 1, 70]):  # skinny and panel paths
        x, qw, c, _ = make(counts, 256, 48, bits, group_size, symmetric, dtype=dtype)
        out = torchmoe.grouped_mm_quantized(x, qw, c)
        assert out.dtype == dtype
        check_close(out, expected(x, qw, c), dtype)


@pytest.mark.parametrize("d_in,d_out", [(2, 1), (6, 17), (130, 300), (512, 33), (1024, 600)])  # the last: two panels
def test_odd_shapes(d_in, d_out):
    for bits, gs, sym in FORMATS:
        if d_in % min(gs, d_in) or (bits == 4 and min(gs, d_in) % 2):
            continue
        x, qw, c, _ = make([3, 0, 40], d_in, d_out, bits, gs, sym)
        check_close(torchmoe.grouped_mm_quantized(x, qw, c), expected(x, qw, c), torch.float32)


def test_empty_and_zero_width():
    _, qw, _, _ = make([0, 0], 64, 8, 4, 32, True)
    out = torchmoe.grouped_mm_quantized(torch.randn(0, 64), qw, torch.zeros(2, dtype=torch.long))
    assert out.shape == (0, 8)
    qw0 = torchmoe.quantize_weight(torch.randn(2, 64, 0), 8)
    assert torchmoe.grouped_mm_quantized(torch.randn(3, 64), qw0, torch.tensor([1, 2])).shape == (3, 0)


# Experts of 8 (int8: 12) to 128 rows (int8: any number) with bfloat16 activations run on AMX where the CPU has it
# (group sizes that are multiples of 32), the skinny kernel or the panels elsewhere; rows around each boundary, a
# last expert whose 16-row tiles run past the end of x, more rows than one AMX pass takes (300 > 256), column counts
# around the 64-column strips and 32-column units, and a group size that AMX does not take (48).
AMX_COUNTS = [[7, 8, 9, 0, 11, 12, 16, 17], [33, 0, 64, 1], [127, 128, 129, 2, 300]]
AMX = _info.cpu_paths()[_info.AMX_PATH].startswith("AMX")


def check_bfloat16_rounding(out, ref, counts, max_rows):
    # Up to max_rows rows (16: the skinny kernel; 128: AMX, int8 more) an expert's products of bfloat16 activations and codes
    # are exact; only the float32 sums and the final rounding differ. More rows multiply bfloat16-rounded panels.
    check_close(out, ref, torch.bfloat16)
    exact_rows = torch.repeat_interleave(counts <= max_rows, counts)
    err = (out.double() - ref).abs()[exact_rows]
    bound = ref.abs()[exact_rows] * 2.0 ** -8 + 1e-5 * ref.abs().max()
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("bits,group_size,symmetric",
                         FORMATS[:5] + [(8, 32, True), (4, 48, True)],
                         ids=FORMAT_IDS[:5] + ["int8-g32-sym", "int4-g48-sym"])
@pytest.mark.parametrize("d_out", [5, 64, 100, 257])
def test_bfloat16_amx_row_range(bits, group_size, symmetric, d_out):
    amx = AMX and group_size % 32 == 0
    for counts in AMX_COUNTS:
        x, qw, c, _ = make(counts, 384, d_out, bits, group_size, symmetric, dtype=torch.bfloat16)
        check_bfloat16_rounding(torchmoe.grouped_mm_quantized(x, qw, c), expected(x, qw, c), c, 128 if amx else 16)


def test_bfloat16_without_amx():
    # TORCHMOE_DISABLE_AMX=1: the skinny kernel and the panels take every row count (as on CPUs without AMX)
    code = f"""
import torch, torchmoe
from torchmoe import reference
g = torch.Generator().manual_seed(0)
for bits, gs, sym in ((8, 64, True), (4, 32, True), (4, 128, False)):
    for counts in {AMX_COUNTS!r}:
        c = torch.tensor(counts)
        x = torch.randn(int(c.sum()), 128, generator=g).bfloat16()
        qw = torchmoe.quantize_weight(torch.randn(len(counts), 128, 70, generator=g), bits, gs, sym)
        out = torchmoe.grouped_mm_quantized(x, qw, c)
        ref = reference.grouped_mm(x.double(), qw.dequantize(torch.float64), c)
        exact = torch.repeat_interleave(c <= 16, c)  # the skinny kernel; more rows multiply bfloat16 panels
        err, scale = (out.double() - ref).abs(), ref.abs().max()
        assert (err[exact] <= ref.abs()[exact] * 2.0 ** -8 + 1e-5 * scale).all(), (bits, gs, sym)
        assert err.max() <= 3e-2 * scale, (bits, gs, sym)
print("ok")
"""
    assert run_python(code, TORCHMOE_DISABLE_AMX="1").strip() == "ok"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS[:3], ids=FORMAT_IDS[:3])
def test_results_do_not_depend_on_thread_count(bits, group_size, symmetric, dtype):
    x, qw, c, _ = make([1, 5, 0, 16, 40, 3, 9, 100], 256, 200, bits, group_size, symmetric, dtype=dtype)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(torchmoe.grouped_mm_quantized(x, qw, c))
            outs.append(torchmoe.grouped_mm_quantized(x, qw, c))
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        assert torch.equal(outs[0], other)


def test_portable_kernels():
    # TORCHMOE_DISABLE_AVX512=1: the portable C++ kernels (as on CPUs without AVX-512)
    code = """
import torch, torchmoe
from torchmoe import reference
g = torch.Generator().manual_seed(0)
for bits, gs, sym in ((8, 64, True), (4, 32, True), (4, 16, False)):
    c = torch.tensor([3, 0, 40])
    x = torch.randn(43, 64, generator=g)
    qw = torchmoe.quantize_weight(torch.randn(3, 64, 50, generator=g), bits, gs, sym)
    out = torchmoe.grouped_mm_quantized(x, qw, c)
    ref = reference.grouped_mm(x.double(), qw.dequantize(torch.float64), c)
    assert (out.double() - ref).abs().max() < 1e-3, (bits, gs, sym)
print("ok")
"""
    assert run_python(code, TORCHMOE_DISABLE_AVX512="1").strip() == "ok"


def test_row_walk_equals_the_strips(tmp_path):
    # TORCHMOE_SKINNY_ROW_WALK=1 / 0 forces the row walk of experts with one row (the default on AMD; for
    # 4 bits and bfloat16 activations on a CPU with AVX-512 BF16 and VBMI, its dot-product form) or the strips
    # (elsewhere): the same multiply-adds in the same order, so the same bits. Columns 771 and 200 leave tails of
    # the 16- and 64-column steps; two threads split an expert's columns.
    code = """
import os, torch, torchmoe
g = torch.Generator().manual_seed(0)
outs = []
# group size 6: an odd number of packed 4-bit rows per group
for bits, gs, sym in ((8, 128, True), (4, 128, True), (4, 64, False), (4, 32, True), (4, 6, False)):
    for d_in, d_out in [(96, 200), (42, 64)] if gs == 6 else [(256, 200), (128, 771), (64, 64)]:
        qw = torchmoe.quantize_weight(torch.randn(5, d_in, d_out, generator=g), bits, min(gs, d_in), sym)
        c = torch.tensor([1, 2, 0, 1, 2])
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(int(c.sum()), d_in, generator=g).to(dtype)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs.append(torchmoe.grouped_mm_quantized(x, qw, c))
torch.save(outs, os.environ["ROW_WALK_TEST_OUT"])
print("ok")
"""
    strips, walked = outputs_of_both_walks(code, tmp_path)
    assert len(strips) == len(walked) == 84
    for a, b in zip(strips, walked):
        assert torch.equal(a, b)
    for bits, symmetric in ((8, True), (4, True), (4, False)):
        x, qw, c, _ = make([1, 2, 0, 1], 256, 200, bits, 128, symmetric, dtype=torch.bfloat16)
        check_close(torchmoe.grouped_mm_quantized(x, qw, c), expected(x, qw, c), torch.bfloat16)


@pytest.mark.parametrize("bits,group_size,symmetric",
                         [(4, 128, True), (4, 64, False), (4, 32, True), (8, 256, True), (8, 255, True)])
@pytest.mark.parametrize("d_out", [771, 200, 64])
def test_bfloat16_dot_product_strips(bits, group_size, symmetric, d_out):
    # Experts with bfloat16 activations take two reduction rows' codes in one vdpbf16ps, up to 64 rows per expert:
    # int4 on CPUs with AVX-512 BF16 and VBMI, int8 (one scale per column: group size d_in) of an even d_in from 3
    # rows on CPUs with AVX-512 BF16 (elsewhere, and int8 of an odd d_in, the multiply-adds up to 16 rows). Up to 16 rows float32 x takes the
    # multiply-add strips: the same sums, so the bfloat16 result is the float32 one rounded. 17 to 64 rows (float32
    # x: the panels' GEMM) are within a bfloat16 rounding of the exact product on the dequantized weight.
    counts = [3, 0, 5, 8, 9, 16, 17, 33, 64, 1, 2, 4]
    d_in = 255 if group_size == 255 else 256
    x, qw, c, _ = make(counts, d_in, d_out, bits, group_size, symmetric, dtype=torch.bfloat16, seed=d_out)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(torchmoe.grouped_mm_quantized(x, qw, c))
            float_out = torchmoe.grouped_mm_quantized(x.float(), qw, c)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])
    out = outs[0]
    small = torch.repeat_interleave(c <= 16, c)
    assert torch.equal(out[small], float_out[small].bfloat16())
    if bits == 8 and d_in % 2:
        return  # past 16 rows the panels of bfloat16-rounded weights: test_activation_dtypes' tolerance
    ref = expected(x, qw, c)
    bound = 2.0 ** -8 * ref.abs() + 1e-5 * ref.abs().max()
    assert bool(((out.double() - ref).abs() <= bound).all())


# --- autograd, opcheck, compile, export, TorchScript --------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS[:3], ids=FORMAT_IDS[:3])
def test_backward_is_grad_x(bits, group_size, symmetric):
    x, qw, c, _ = make([3, 0, 40, 1], 64, 24, bits, group_size, symmetric)
    x.requires_grad_(True)
    grad = torch.randn(x.shape[0], 24)
    (gx,) = torch.autograd.grad(torchmoe.grouped_mm_quantized(x, qw, c), x, grad)
    xr = x.detach().double().requires_grad_(True)
    (rx,) = torch.autograd.grad(reference.grouped_mm(xr, qw.dequantize(torch.float64), c), xr, grad.double())
    check_close(gx, rx, torch.float32)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    c = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    for bits, gs, sym in ((8, 8, True), (4, 4, False)):
        qw = torchmoe.quantize_weight(torch.randn(4, 8, 5, generator=g), bits, gs, sym)
        assert torch.autograd.gradcheck(lambda a: torchmoe.grouped_mm_quantized(a, qw, c), (x,))
        assert torch.autograd.gradgradcheck(lambda a: torchmoe.grouped_mm_quantized(a, qw, c), (x,))


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS[:3], ids=FORMAT_IDS[:3])
def test_opcheck(bits, group_size, symmetric):
    x, qw, c, _ = make([3, 0, 20], 64, 16, bits, group_size, symmetric)
    args = (qw.qweight, qw.scales, qw.zeros, c, qw.bits, qw.group_size)
    torch.library.opcheck(torch.ops.torchmoe.grouped_mm_quantized.default, (x.requires_grad_(True),) + args)
    torch.library.opcheck(torch.ops.torchmoe._grouped_mm_quantized_backward.default,
                          (torch.randn(x.shape[0], 16),) + args)


def test_meta_shapes():
    _, qw, c, _ = make([3, 4], 64, 16, 4, 32, False)
    out = torch.ops.torchmoe.grouped_mm_quantized(torch.empty(7, 64, device="meta"), qw.qweight.to("meta"),
                                                  qw.scales.to("meta"), qw.zeros.to("meta"), c.to("meta"), 4, 32)
    assert out.shape == (7, 16) and out.device.type == "meta"


def test_compile_fullgraph_matches_eager():
    x, qw, c, _ = make([9, 0, 14, 3], 64, 32, 4, 32, True)
    _, qw2, _, _ = make([1, 1, 1, 1], 32, 64, 8, 128, True, seed=1)

    def f(x, c):
        h = torch.relu(torchmoe.grouped_mm_quantized(x, qw, c))
        return torchmoe.grouped_mm_quantized(h, qw2, c)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x.requires_grad_(True)
    for counts in ([9, 0, 14, 3], [1, 20, 0, 5]):
        c = torch.tensor(counts)
        out_e, out_c = f(x, c), compiled(x, c)
        torch.testing.assert_close(out_c, out_e)
        torch.testing.assert_close(torch.autograd.grad(out_c.sum(), x)[0], torch.autograd.grad(out_e.sum(), x)[0])


def test_compile_inductor():
    x, qw, c, _ = make([5, 2, 0, 8], 64, 16, 4, 64, False)
    compiled = torch.compile(lambda a, cc: torch.tanh(torchmoe.grouped_mm_quantized(a, qw, cc)), fullgraph=True)
    torch.testing.assert_close(compiled(x, c), torch.tanh(torchmoe.grouped_mm_quantized(x, qw, c)))


class _Layer(torch.nn.Module):
    def __init__(self, qw):
        super().__init__()
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.bits, self.group_size = qw.bits, qw.group_size

    def forward(self, x, counts):
        return torch.ops.torchmoe.grouped_mm_quantized(x, self.qweight, self.scales, self.zeros, counts, self.bits,
                                                       self.group_size)


def test_export_with_dynamic_batch():
    _, qw, _, _ = make([1, 1], 64, 16, 4, 32, False)
    layer = _Layer(qw)
    batch = torch.export.Dim("batch", min=1, max=4096)
    x = torch.randn(6, 64)
    ep = torch.export.export(layer, (x, torch.tensor([2, 4])), dynamic_shapes=({0: batch}, None))
    for n, counts in ((1, [1, 0]), (9, [4, 5]), (33, [0, 33])):
        x = torch.randn(n, 64)
        c = torch.tensor(counts)
        torch.testing.assert_close(ep.module()(x, c), layer(x, c))


def test_torchscript_save_load_in_fresh_process(tmp_path):
    x, qw, c, _ = make([3, 0, 5], 64, 16, 4, 32, True)
    scripted = torch.jit.script(_Layer(qw))
    path = tmp_path / "layer.pt"
    scripted.save(str(path))
    torch.save({"x": x, "c": c, "y": scripted(x, c)}, tmp_path / "io.pt")
    code = f"""
import torch, torchmoe
m = torch.jit.load({str(path)!r})
io = torch.load({str(tmp_path / 'io.pt')!r})
assert torch.equal(m(io["x"], io["c"]), io["y"])
print("ok")
"""
    assert run_python(code).strip() == "ok"


# --- bad input ----------------------------------------------------------------------------------------------------

def _args():
    x, qw, c, _ = make([2, 3], 64, 8, 4, 32, False)
    return dict(x=x, qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, counts=c, bits=4, group_size=32)


def _call(a):
    return torch.ops.torchmoe.grouped_mm_quantized(a["x"], a["qweight"], a["scales"], a["zeros"], a["counts"],
                                                   a["bits"], a["group_size"])


@pytest.mark.parametrize("change,arg", [
    (dict(bits=3), "bits"),
    (dict(bits=8), "qweight"),
    (dict(group_size=48), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(scales=torch.ones(2, 3, 8)), "scales"),
    (dict(scales=torch.ones(2, 2, 8, dtype=torch.float64)), "scales"),
    (dict(zeros=torch.zeros(2, 2, 7, dtype=torch.uint8)), "zeros"),
    (dict(zeros=torch.zeros(2, 2, 8, dtype=torch.int32)), "zeros"),
    (dict(qweight=torch.zeros(2, 32, 8, dtype=torch.int8)), "qweight"),
    (dict(x=torch.randn(5, 63)), "x"),
    (dict(x=torch.ones(5, 64, dtype=torch.long)), "x"),
    (dict(counts=torch.tensor([2, 2])), "counts"),
    (dict(counts=torch.tensor([2, 3, 0])), "counts"),
    (dict(counts=torch.tensor([6, -1])), "counts"),
    (dict(counts=torch.tensor([2.0, 3.0])), "counts"),
])
def test_bad_input_names_the_argument(change, arg):
    a = _args()
    a.update(change)
    with pytest.raises(RuntimeError, match=f"argument '{arg}'"):
        _call(a)


def test_int8_rejects_zeros():
    x, qw, c, _ = make([2, 3], 64, 8, 8, 64, True)
    with pytest.raises(RuntimeError, match="argument 'zeros'"):
        torch.ops.torchmoe.grouped_mm_quantized(x, qw.qweight, qw.scales, torch.zeros(2, 1, 8, dtype=torch.uint8),
                                                c, 8, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_devices_match_cpu(device):
    if device == "cpu":
        pytest.skip("the CPU is the reference here")
    x, qw, c, _ = make([3, 0, 40], 128, 64, 4, 64, False)
    out = torchmoe.grouped_mm_quantized(x.to(device), qw.to(device), c.to(device))
    check_close(out.cpu(), expected(x, qw, c), torch.float32)
