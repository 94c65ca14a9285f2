"""The attention dispatch and the model's elementwise ops (CPU references; CUDA twins skip here).

Oracle: attention written out as softmax(QK^T/sqrt(d) + mask) V over the whole packed sequence with
a block-diagonal (and for the LLM causal) mask, in float64. fp32 SDPA agrees to ~1e-6.
"""
import pytest
import torch

from lingshu_fast.model import ops
from lingshu_fast.model.attention import resolve_backend, varlen_attention


def _oracle(q, k, v, cu_seqlens, causal):
    q, k, v = (t.double() for t in (q, k, v))
    tokens, heads, dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    segment = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    allowed = segment[:, None] == segment[None, :]
    if causal:
        allowed &= torch.ones(tokens, tokens, dtype=torch.bool).tril()
    scores = torch.einsum("thd,shd->hts", q, k) / dim ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


@pytest.mark.parametrize("causal,q_heads,kv_heads", [(True, 4, 2), (False, 2, 2), (True, 6, 1)])
def test_varlen_sdpa_matches_masked_oracle(causal, q_heads, kv_heads):
    """Pins: no attention across packed samples/windows, causal inside each, GQA head grouping."""
    torch.manual_seed(0)
    # a length-1 segment, and an empty one (the pipeline pads cu_seqlens to a fixed number of slots)
    cu = torch.tensor([0, 5, 6, 6, 19, 32], dtype=torch.int32)
    q = torch.randn(32, q_heads, 16)
    k, v = torch.randn(32, kv_heads, 16), torch.randn(32, kv_heads, 16)
    out = varlen_attention(q, k, v, cu, 13, causal=causal, backend="sdpa")
    torch.testing.assert_close(out.double(), _oracle(q, k, v, cu, causal), atol=1e-5, rtol=0)


def test_backend_choice_and_errors_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    for backend in ("flash", "varlen"):
        with pytest.raises(ValueError, match="needs CUDA"):
            resolve_backend(backend, cpu)
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("xformers", cpu)
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens ends at 5"):
        varlen_attention(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5, causal=True)


def test_cpu_ops_stay_on_reference_when_triton_is_forced(monkeypatch):
    """Pins: Liger's kernels do not run under TRITON_INTERPRET, so a test that forces
    LINGSHU_KERNELS=triton for the losses must still be able to run the model on CPU."""
    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    x, w = torch.randn(3, 8), torch.rand(8)
    expected = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), expected)
    torch.testing.assert_close(ops.swiglu(x, x), torch.nn.functional.silu(x) * x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_cuda_attention_and_liger_ops_match_cpu_reference(backend):
    """CUDA twin: flash/varlen attention and Liger RMSNorm/SwiGLU/RoPE against the CPU fp32 path.
    bf16 tolerance 2e-2: inputs are O(1) and bf16 keeps 8 mantissa bits."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 37, 38, 128], dtype=torch.int32)
    q, k, v = torch.randn(128, 8, 64), torch.randn(128, 2, 64), torch.randn(128, 2, 64)
    ref = varlen_attention(q, k, v, cu, 90, causal=True, backend="sdpa")
    dev = [t.cuda().bfloat16() for t in (q, k, v)]
    out = varlen_attention(*dev, cu.cuda(), 90, causal=True, backend=backend)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)
    x, w = torch.randn(64, 256), torch.rand(256)
    torch.testing.assert_close(ops.rms_norm(x.cuda(), w.cuda(), 1e-6).cpu(), ops.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.swiglu(x.cuda(), w.cuda().expand_as(x)).cpu(), ops.swiglu(x, w.expand_as(x)),
                               atol=1e-5, rtol=1e-5)
    angles = torch.randn(128, 32)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q_ref, k_ref = ops.apply_rotary(q, k, cos, sin)
    q_gpu, k_gpu = ops.apply_rotary(q.cuda(), k.cuda(), cos.cuda(), sin.cuda())
    torch.testing.assert_close(q_gpu.cpu(), q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_gpu.cpu(), k_ref, atol=1e-5, rtol=1e-5)


def test_torch_varlen_call_adapts_to_both_signatures(monkeypatch):
    """Pins the CUDA fallback's plumbing (the kernel itself needs CUDA): torch 2.10 spells causal
    `is_causal` and has no `enable_gqa`; 2.11+ uses `window_size` and `enable_gqa`. Fakes with each
    signature, computing through the SDPA path, must both give the oracle's answer."""
    from lingshu_fast.model import attention

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):
        assert key.shape[1] == query.shape[1]  # K/V heads were repeated for GQA
        return attention._sdpa_segments(query, key, value, cu_seq_q, is_causal, query.shape[-1] ** -0.5)

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
            enable_gqa=False):
        assert enable_gqa == (key.shape[1] != query.shape[1])
        return attention._sdpa_segments(query, key, value, cu_seq_q, window_size == (-1, 0), scale)

    torch.manual_seed(0)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    for fake in (old, new):
        monkeypatch.setattr(attention, "_torch_varlen_func", lambda fake=fake: fake)
        for causal in (True, False):
            out = attention._torch_varlen(q, k, v, cu, 13, causal, 8 ** -0.5)
            torch.testing.assert_close(out.double(), _oracle(q, k, v, cu, causal), atol=1e-5, rtol=0)
