import pytest
import torch

from radixserve.disaggregation.kv_layout import KVBuffers, copy_by_address, transfer_plan
from radixserve.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

PAGE = 4


def _pools(kind):
    if kind == "mha":
        mk = lambda: MHATokenToKVPool(63, torch.float16, 2, 8, 3, "cpu", v_head_dim=6)
    else:
        mk = lambda: MLATokenToKVPool(63, torch.bfloat16, 16, 4, 3, "cpu")
    src, dst = mk(), mk()
    for t in (src.kv_buffer if kind == "mla" else src.k_buffer + src.v_buffer):
        t.copy_(torch.randn(t.shape))
    return src, dst


def _bufs(pool):
    return list(pool.kv_buffer) if hasattr(pool, "kv_buffer") else pool.k_buffer + pool.v_buffer


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_page_indexed_copy_equals_source_pages(kind):
    src, dst = _pools(kind)
    src_pages, dst_pages = [3, 1, 7, 8], [0, 5, 2, 15]
    plan = transfer_plan(KVBuffers.from_pool(src, PAGE), src_pages,
                         KVBuffers.from_pool(dst, PAGE), dst_pages)
    copy_by_address(plan)
    sent = set()
    for s_t, d_t in zip(_bufs(src), _bufs(dst)):
        for ps, pd in zip(src_pages, dst_pages):
            assert torch.equal(d_t[pd * PAGE:(pd + 1) * PAGE], s_t[ps * PAGE:(ps + 1) * PAGE])
            sent.update(range(pd * PAGE, (pd + 1) * PAGE))
        others = [r for r in range(d_t.shape[0]) if r not in sent]
        assert torch.count_nonzero(d_t[others]) == 0


def test_mismatched_layout_and_out_of_range_rejected():
    src, _ = _pools("mha")
    _, mla = _pools("mla")
    with pytest.raises(ValueError):
        transfer_plan(KVBuffers.from_pool(src, PAGE), [0], KVBuffers.from_pool(mla, PAGE), [0])
    with pytest.raises(ValueError):
        transfer_plan(KVBuffers.from_pool(src, PAGE), [16], KVBuffers.from_pool(src, PAGE), [0])
