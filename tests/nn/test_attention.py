"""QuantAttnProcessor on diffusers ``Attention``: exact when inactive, right tensors when active."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from diffquant.errors import DiffquantError
from diffquant.nn.attention import QuantAttnProcessor
from diffquant.nn.layers import QuantizerSpec

A8 = QuantizerSpec(bits=8)
P8 = QuantizerSpec(bits=8, grid="unsigned")
A16 = QuantizerSpec(bits=16)


def make_attention(kind: str, device: str) -> tuple[Attention, tuple, dict]:
    """An Attention module and one call's inputs: self-attention on an image (UNet2DModel's
    attention block), cross-attention on tokens, and self-attention with a q/k LayerNorm."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "image_self":
        attn = Attention(16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True, bias=True,
                         upcast_softmax=True, rescale_output_factor=1.0, _from_deprecated_attn_block=True)
        args, kwargs = (torch.randn(2, 16, 4, 4, generator=gen),), {}
    elif kind == "cross":
        attn = Attention(16, cross_attention_dim=8, heads=2, dim_head=8)
        ctx = torch.randn(2, 5, 8, generator=gen)
        args, kwargs = (torch.randn(2, 6, 16, generator=gen),), {"encoder_hidden_states": ctx}
    else:  # qk_norm
        attn = Attention(16, heads=2, dim_head=8, qk_norm="layer_norm")
        with torch.no_grad():
            attn.norm_q.weight.uniform_(0.5, 2.0)
            attn.norm_k.bias.uniform_(-1.0, 1.0)
        args, kwargs = (torch.randn(2, 6, 16, generator=gen),), {}
    attn = attn.to(device).eval()
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    return attn, args, kwargs


KINDS = ["image_self", "cross", "qk_norm"]


def install(attn: Attention, act: QuantizerSpec, probs: QuantizerSpec) -> QuantAttnProcessor:
    proc = QuantAttnProcessor(act, probs, float_processor=attn.processor).to(next(attn.parameters()).device)
    attn.set_processor(proc)
    return proc


def calibrate(attn, proc, args, kwargs):
    for q in proc.quantizers().values():
        q.mode = "observe"
    with torch.no_grad():
        attn(*args, **kwargs)
    for q in proc.quantizers().values():
        q.mode = "quantize"


@pytest.mark.parametrize("kind", KINDS)
def test_inactive_quantizers_reproduce_float_attention_exactly(kind, device):
    attn, args, kwargs = make_attention(kind, device)
    with torch.no_grad():
        reference = attn(*args, **kwargs)
    proc = install(attn, A16, A16)
    assert not proc.active
    with torch.no_grad():
        assert torch.equal(attn(*args, **kwargs), reference)
    # 8-bit quantizers switched off behave the same
    proc8 = install(attn, A8, P8)
    proc8.use_act_quant = False
    with torch.no_grad():
        assert torch.equal(attn(*args, **kwargs), reference)


@pytest.mark.parametrize("kind", KINDS)
def test_eight_bit_quantizers_see_the_right_tensors(kind, device):
    attn, args, kwargs = make_attention(kind, device)
    with torch.no_grad():
        reference = attn(*args, **kwargs)
    proc = install(attn, A8, P8)
    calibrate(attn, proc, args, kwargs)

    seen: dict[str, torch.Tensor] = {}
    for name, q in proc.quantizers().items():
        q.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
    with torch.no_grad():
        out = attn(*args, **kwargs)
    assert set(seen) == {"q", "k", "v", "probs"}

    # recompute the inputs of QKᵀ and P·V from the module's own layers
    with torch.no_grad():
        h = args[0]
        if h.dim() == 4:
            h = attn.group_norm(h.flatten(2)).transpose(1, 2)
        ctx = kwargs.get("encoder_hidden_states", h)
        query = attn.head_to_batch_dim(attn.to_q(h))
        key = attn.head_to_batch_dim(attn.to_k(ctx))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        value = attn.head_to_batch_dim(attn.to_v(ctx))
    torch.testing.assert_close(seen["q"][0], query)
    torch.testing.assert_close(seen["k"][0], key)
    torch.testing.assert_close(seen["v"][0], value)

    probs_in, probs_out = seen["probs"]
    assert probs_in.shape == (query.shape[0], query.shape[1], key.shape[1])
    assert probs_in.min() >= 0 and probs_in.max() <= 1
    torch.testing.assert_close(probs_in.sum(-1), torch.ones_like(probs_in.sum(-1)))
    pq = proc.probs_quantizer
    assert pq.grid == "unsigned" and pq.zero_point.abs().max() == 0
    assert pq.step.item() == pytest.approx(probs_in.max().item() / 255, rel=1e-5)
    # P is expected to be the softmax of the quantized q and k, and P·V to use the quantized v
    scores = torch.bmm(seen["q"][1].float(), seen["k"][1].float().transpose(-1, -2)) * attn.scale
    torch.testing.assert_close(probs_in, scores.softmax(-1))
    hidden = attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs_out, seen["v"][1])))
    if h is not args[0]:
        hidden = hidden.transpose(-1, -2).reshape(args[0].shape) + args[0]
    torch.testing.assert_close(out, hidden / attn.rescale_output_factor)

    # 8-bit output: close to the float one, but not equal
    assert not torch.equal(out, reference)
    rel = (out - reference).norm() / reference.norm()
    assert 0 < rel < 0.05


def test_processor_is_installed_with_set_processor(device):
    attn, args, kwargs = make_attention("image_self", device)
    float_processor = attn.processor
    methods = {name: getattr(Attention, name) for name in ("forward", "set_processor", "prepare_attention_mask")}
    proc = install(attn, A8, P8)
    assert type(attn) is Attention
    assert all(getattr(type(attn), name) is fn for name, fn in methods.items())
    assert "forward" not in vars(attn)
    assert attn.processor is proc and proc.float_processor is float_processor
    keys = set(attn.state_dict())
    for name in ("q", "k", "v", "probs"):
        for tensor in ("step", "zero_point", "initialized", "range_lo", "range_hi"):
            assert f"processor.{name}_quantizer.{tensor}" in keys
    assert not any("float_processor" in k for k in keys)
    assert proc.q_quantizer.step.device.type == torch.device(device).type


def test_quantized_attention_needs_calibration():
    attn, args, kwargs = make_attention("cross", "cpu")
    install(attn, A8, P8)
    with pytest.raises(DiffquantError, match="initialised"):
        attn(*args, **kwargs)


def test_attention_mask_is_applied_in_the_quantized_path(device):
    attn, args, kwargs = make_attention("cross", device)
    mask = torch.zeros(2, 1, 5, device=device)
    mask[:, :, 3:] = -10000.0  # hide the last two context tokens
    with torch.no_grad():
        unmasked = attn(*args, **kwargs)
        reference = attn(*args, attention_mask=mask, **kwargs)
    assert (reference - unmasked).abs().max() > 1e-2
    proc = install(attn, A8, P8)
    calibrate(attn, proc, args, {**kwargs, "attention_mask": mask})
    probs = []
    proc.probs_quantizer.register_forward_hook(lambda m, inp, out: probs.append(inp[0]))
    with torch.no_grad():
        out = attn(*args, attention_mask=mask, **kwargs)
    assert probs[0][..., 3:].max() < 1e-6  # masked keys get no probability
    rel = (out - reference).norm() / reference.norm()
    assert rel < 0.05


@pytest.mark.parametrize("budget", ["one_token", "two_tokens", "one_row"])
@pytest.mark.parametrize("kind", ["image_self", "cross"])
def test_chunked_inference_equals_the_whole_computation(kind, budget, monkeypatch):
    """Rows and, where one row's scores exceed the budget, query tokens go in chunks: the score
    tensors stay within the budget and the result equals the whole computation (bit-identical by
    rows; to float rounding by query tokens)."""
    import diffquant.nn.attention as attention_module

    attn, args, kwargs = make_attention(kind, "cpu")
    if kind == "cross":
        mask = torch.zeros(2, 1, 5)
        mask[1, :, 2:] = -10000.0
        kwargs = {**kwargs, "attention_mask": mask}
    proc = install(attn, A8, P8)
    calibrate(attn, proc, args, kwargs)
    monkeypatch.setattr(attention_module, "SCORE_CHUNK_ELEMENTS", 1 << 30)
    with torch.no_grad():
        whole = attn(*args, **kwargs)
    n_q, n_k = (16, 16) if kind == "image_self" else (6, 5)
    limit = {"one_token": 1, "two_tokens": 2 * n_k, "one_row": n_q * n_k}[budget]
    calls = []
    original = proc._attend_rows
    monkeypatch.setattr(proc, "_attend_rows", lambda *a: calls.append(tuple(a[0].shape[:2])) or original(*a))
    monkeypatch.setattr(attention_module, "SCORE_CHUNK_ELEMENTS", limit)
    with torch.no_grad():
        chunked = attn(*args, **kwargs)
    tokens = {"one_token": 1, "two_tokens": 2, "one_row": n_q}[budget]
    assert all(rows == 1 and t <= tokens for rows, t in calls)  # batch 2 × 2 heads, one row at a time
    assert sum(t for _, t in calls) == 4 * n_q and all(r * t * n_k <= max(limit, n_k) for r, t in calls)
    if budget == "one_row":
        assert torch.equal(chunked, whole)
    else:  # a query chunk's QKᵀ is another GEMM shape: float rounding of the scores may differ
        assert (chunked - whole).abs().max() < 1e-5, (chunked - whole).abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_an_unquantized_softmax_runs_fused_without_a_probability_tensor(kind, monkeypatch):
    """softmax_bits 16: q, k, v quantized, then one scaled_dot_product_attention call; the result
    equals the explicit FP32 softmax path to float rounding."""
    import diffquant.nn.attention as attention_module

    attn, args, kwargs = make_attention(kind, "cpu")
    proc = install(attn, A8, A16)
    calibrate(attn, proc, args, kwargs)
    assert not proc.probs_quantizer.active and proc.active
    explicit = []
    original = proc._attend_rows
    monkeypatch.setattr(proc, "_attend_rows", lambda *a: explicit.append(1) or original(*a))
    fused = []
    real_sdpa = attention_module.F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: fused.append(1) or real_sdpa(*a, **k))
    with torch.no_grad():
        out = attn(*args, **kwargs)
    assert fused == [1] and explicit == []
    monkeypatch.setattr(proc, "_fused", lambda q, k, v, m, s: original(q, k, v, m, s))
    with torch.no_grad():
        reference = attn(*args, **kwargs)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-6)
