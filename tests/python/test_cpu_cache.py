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
    # 3 MiB limit: a 2 MiB and a 2.5 MiB free block do not both fit, so the older one goes.
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
    assert run_python(code, TORCHMOE_CPU_CACHE_MB="3").split() == [str(2 << 20), str(5 << 19), str(5 << 19)]


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
