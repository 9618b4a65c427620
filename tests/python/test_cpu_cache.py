"""The CPU kernels' cache of large freed outputs: blocks are reused, results stay exact on reused
(dirty) memory, the cache can be emptied and turned off, and cached outputs behave like any tensor."""
import gc

import torch

import torchmoe
from torchmoe import reference

from conftest import run_python


def big_grouped_mm_inputs():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([700, 0, 324])
    return torch.randn(1024, 64, generator=g), torch.randn(3, 64, 512, generator=g), counts  # out: 2 MiB


def test_freed_output_block_is_reused_and_counted():
    torchmoe.empty_cpu_cache()
    x, w, c = big_grouped_mm_inputs()
    out = torchmoe.grouped_mm(x, w, c)
    ptr, nbytes = out.data_ptr(), out.numel() * out.element_size()
    assert torchmoe.cpu_cache_bytes() == 0
    del out
    assert torchmoe.cpu_cache_bytes() >= nbytes
    again = torchmoe.grouped_mm(x, w, c)
    assert again.data_ptr() == ptr
    assert torchmoe.cpu_cache_bytes() == 0
    torch.testing.assert_close(again, reference.grouped_mm(x, w, c), atol=1e-4, rtol=1e-4)


def test_results_exact_on_reused_memory():
    # dispatch zero-fills unfilled rows and combine overwrites every row: a block full of another op's
    # values must not leak into either.
    torchmoe.empty_cpu_cache()
    for _ in range(3):
        junk = torchmoe.grouped_mm(*big_grouped_mm_inputs())  # 2 MiB of nonzero values
        del junk
        x = torch.randn(2048, 256)
        dest = torch.randint(-1, 4096, (2048, 1))
        dest = torch.where(dest >= 0, torch.randperm(4096)[:2048].view(2048, 1), dest)
        out = torchmoe.dispatch(x, dest, 4096)
        assert torch.equal(out, reference.dispatch(x, dest, 4096))
        y = torchmoe.combine(out, dest, torch.rand(2048, 1))
        assert torch.equal(y == 0, (dest < 0).expand(-1, 256) | (x == 0))


def test_empty_cache_frees_blocks():
    x, w, c = big_grouped_mm_inputs()
    torchmoe.grouped_mm(x, w, c)  # the output is freed at once
    assert torchmoe.cpu_cache_bytes() > 0
    freed = torchmoe.empty_cpu_cache()
    assert freed > 0 and torchmoe.cpu_cache_bytes() == 0


def test_cached_output_resizes_and_outlives_release():
    torchmoe.empty_cpu_cache()
    x, w, c = big_grouped_mm_inputs()
    out = torchmoe.grouped_mm(x, w, c)
    expected = out.clone()
    torchmoe.empty_cpu_cache()  # live outputs are not touched
    assert torch.equal(out, expected)
    out.resize_(2048, 1024)  # storage grows through the cache's allocator
    out.fill_(2.0)
    assert out.sum().item() == 2.0 * 2048 * 1024
    del out
    assert torchmoe.cpu_cache_bytes() > 0


def test_cache_disabled_by_environment():
    code = (
        "import torch, torchmoe\n"
        "x = torch.randn(1024, 64); w = torch.randn(1, 64, 512); c = torch.tensor([1024])\n"
        "out = torchmoe.grouped_mm(x, w, c); del out\n"
        "print(torchmoe.cpu_cache_bytes())\n"
    )
    assert run_python(code, TORCHMOE_CPU_CACHE_MB="0").strip() == "0"


def test_cache_limit_evicts_longest_held_blocks():
    # 3 MiB limit: a 2 MiB and a 2.5 MiB free block do not both fit, so the older one goes. The 4 MiB request
    # finds no block large enough: the free 2.5 MiB go before it is mapped, and it is above the limit itself.
    code = (
        "import torch, torchmoe\n"
        "a = torchmoe.dispatch(torch.randn(4, 512 * 256), torch.tensor([[0], [1], [2], [3]]), 4)\n"  # 2 MiB
        "b = torchmoe.dispatch(torch.randn(5, 512 * 256), torch.tensor([[0], [1], [2], [3], [4]]), 5)\n"  # 2.5 MiB
        "del a\n"
        "print(torchmoe.cpu_cache_bytes())\n"
        "del b\n"
        "print(torchmoe.cpu_cache_bytes())\n"
        "big = torchmoe.dispatch(torch.randn(8, 512 * 256), torch.arange(8).view(8, 1), 8)\n"  # 4 MiB > limit
        "del big\n"
        "print(torchmoe.cpu_cache_bytes())\n"
    )
    assert run_python(code, TORCHMOE_CPU_CACHE_MB="3").split() == [str(2 << 20), str(5 << 19), "0"]


def rows_output(rows: int) -> torch.Tensor:
    """A cached output of rows x 256 KiB (dispatch of one float32 row of 65536 per token)."""
    return torchmoe.dispatch(torch.ones(rows, 65536), torch.arange(rows).view(rows, 1), rows)


def test_smaller_request_reuses_a_larger_block_and_returns_the_rest():
    torchmoe.empty_cpu_cache()
    big = rows_output(16)  # 4 MiB
    ptr = big.data_ptr()
    del big
    assert torchmoe.cpu_cache_bytes() == 4 << 20
    small = rows_output(8)  # 2 MiB: best fit is the 4 MiB block, its last 2 MiB of pages go back to the OS
    assert small.data_ptr() == ptr and torchmoe.cpu_cache_bytes() == 0
    assert torch.equal(small, torch.ones(8, 65536))
    del small
    assert torchmoe.cpu_cache_bytes() == 2 << 20  # only the pages the 2 MiB output held
    again = rows_output(16)  # grows back into the same block
    assert again.data_ptr() == ptr and torch.equal(again, torch.ones(16, 65536))
    del again
    assert torchmoe.cpu_cache_bytes() == 4 << 20


def test_free_blocks_go_before_a_larger_request_is_mapped():
    torchmoe.empty_cpu_cache()
    first, second = rows_output(8), rows_output(4)  # 2 MiB and 1 MiB
    del first, second
    assert torchmoe.cpu_cache_bytes() == 3 << 20
    live = rows_output(12)  # 3 MiB: no free block fits, so the 3 MiB of free blocks are unmapped first
    assert torchmoe.cpu_cache_bytes() == 0
    del live
    assert torchmoe.cpu_cache_bytes() == 3 << 20


# Trains a dropless MoE on batches of varying length in a fresh process and prints the peak RSS growth over the
# loop (VmHWM reset through /proc/self/clear_refs) and the bytes the cache holds at the end.
PEAK_RSS_CODE = """
import torch, torchmoe
from torchmoe.nn import MoE

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

torch.manual_seed(0)
moe = MoE(128, 512, 8, k=2, capacity_factor=None)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
for tokens in (4096, 2048, 3000, 4096, 1024, 3500, 2500, 4000, 1500, 3800):
    x = torch.randn(tokens, 128, requires_grad=True)
    moe(x).sum().backward()
    moe.zero_grad(set_to_none=True)
print(status("VmHWM") - base, torchmoe.cpu_cache_bytes())
"""


def test_peak_memory_with_varying_shapes_stays_that_of_no_cache():
    with_cache = [int(v) for v in run_python(PEAK_RSS_CODE).split()]
    without = [int(v) for v in run_python(PEAK_RSS_CODE, TORCHMOE_CPU_CACHE_MB="0").split()]
    assert without[1] == 0 and with_cache[1] > 0, "the cache is on by default and keeps blocks"
    assert with_cache[0] <= 1.15 * without[0], f"peak RSS growth {with_cache[0]} with the cache, {without[0]} without"


def test_forked_children_use_the_cache():
    # The cache's lock is held across fork() (pthread_atfork) and released on both sides; parent and children
    # must keep allocating and freeing cached blocks afterwards.
    code = """
import os, torch, torchmoe
dest = torch.arange(8).view(8, 1)
torchmoe.dispatch(torch.ones(8, 65536), dest, 8)  # leaves a 2 MiB block in the cache
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        ok = all(torchmoe.dispatch(torch.ones(8, 65536), dest, 8).sum().item() == 8 * 65536 for _ in range(3))
        os._exit(0 if ok and torchmoe.cpu_cache_bytes() > 0 else 1)
    children.append(pid)
    torchmoe.dispatch(torch.ones(8, 65536), dest, 8)
print(all(os.waitpid(pid, 0)[1] == 0 for pid in children) and torchmoe.cpu_cache_bytes() > 0)
"""
    assert run_python(code, timeout=120).strip() == "True"


def test_cache_ops_in_torchscript():
    @torch.jit.script
    def held() -> int:
        return torch.ops.torchmoe._cpu_cache_bytes()

    gc.collect()  # outputs of earlier tests held by reference cycles
    torchmoe.empty_cpu_cache()
    assert held() == 0
