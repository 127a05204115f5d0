"""Quantized act-to-act matmuls of diffusers ``Attention`` (docs/methods.md §1.8).

Installed with ``Attention.set_processor`` — the Attention module itself is not patched. The
processor is an ``nn.Module``, so its quantizers are registered under ``<attn>.processor`` and
saved with the rest of the quantizer state.

- q and k: per-tensor, A bits, asymmetric, quantized before QKᵀ;
- scores and softmax in FP32; the probabilities P on an unsigned zero-anchored grid
  (``softmax_bits``, 16 = not quantized);
- v: per-tensor, A bits, quantized before P·V. P·V itself is left to the next linear layer.

When none of its quantizers is active the original float processor runs, so a W16A16 model
reproduces the float model exactly.

Memory: at inference the score matrix is never materialised whole. With the softmax output not
quantized, P·V runs as one fused ``scaled_dot_product_attention`` on the quantized q, k, v (no
probability tensor at all); otherwise rows (batch·heads) and, where one row's scores exceed the
budget, query tokens go in chunks of at most ``SCORE_CHUNK_ELEMENTS`` (CPU: cache-sized) or
``DEVICE_SCORE_CHUNK_ELEMENTS`` (accelerators) score elements, so memory grows with
batch × tokens × chunk rather than × tokens². Rows and query tokens are independent and the
quantizers are static then, so the result equals the whole computation (bit-identical for row
chunks; for query-token chunks and the fused kernel up to the float rounding of another GEMM
shape). A probs quantizer that observes or learns sees the whole tensor, as one batch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import torch.nn.functional as F

from .layers import QuantizerSpec, _needs_module_call, quantize_activation

MATMUL_QUANTIZERS = ("q", "k", "v", "probs")
#: score-matrix elements per chunk at CPU inference (2 MiB of float32: stays in cache)
SCORE_CHUNK_ELEMENTS = 1 << 19
#: score-matrix elements per chunk on an accelerator (256 MiB of float32)
DEVICE_SCORE_CHUNK_ELEMENTS = 1 << 26


class QuantAttnProcessor(nn.Module):
    def __init__(self, act_spec: QuantizerSpec, softmax_spec: QuantizerSpec, float_processor=None):
        super().__init__()
        self.q_quantizer = act_spec.build()
        self.k_quantizer = act_spec.build()
        self.v_quantizer = act_spec.build()
        self.probs_quantizer = softmax_spec.build()
        # kept as a plain attribute (not a submodule) so it is neither saved nor moved
        self.__dict__["float_processor"] = float_processor
        self.use_act_quant = True

    def quantizers(self) -> dict[str, nn.Module]:
        return {name: getattr(self, f"{name}_quantizer") for name in MATMUL_QUANTIZERS}

    @property
    def active(self) -> bool:
        return self.use_act_quant and any(q.active for q in self.quantizers().values())

    def _maybe(self, quantizer: nn.Module, x: Tensor) -> Tensor:
        return quantize_activation(quantizer, x) if self.use_act_quant else x

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # explicit signature: diffusers forwards only the keyword arguments a processor names
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self.active and self.float_processor is not None:
            return self.float_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self._quantized_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _quantized_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        # per-head q/k norms (qk_norm models) come before QKᵀ, as in diffusers' AttnProcessor2_0
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        query = self._maybe(self.q_quantizer, query)
        key = self._maybe(self.k_quantizer, key)
        value = self._maybe(self.v_quantizer, attn.head_to_batch_dim(value))

        hidden_states = self._attend(query, key, value, attention_mask, attn.scale)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        """Q(P)·V with P = softmax(scale·QKᵀ + mask), over rows [B·heads, tokens, dim], in chunks
        at inference (see the module docstring)."""
        rows, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
        learning = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        if learning or _needs_module_call(self.probs_quantizer, query):
            return self._attend_rows(query, key, value, mask, scale)
        if not (self.use_act_quant and self.probs_quantizer.active):
            return self._fused(query, key, value, mask, scale)
        budget = SCORE_CHUNK_ELEMENTS if query.device.type == "cpu" else DEVICE_SCORE_CHUNK_ELEMENTS
        if rows * n_q * n_k <= budget:
            return self._attend_rows(query, key, value, mask, scale)
        row_chunk = max(1, budget // (n_q * n_k))
        token_chunk = n_q if row_chunk > 1 else max(1, budget // n_k)
        per_row_mask = mask is not None and mask.shape[0] == rows
        per_token_mask = mask is not None and mask.shape[-2] == n_q
        out = []
        for i in range(0, rows, row_chunk):
            q_rows, k_rows, v_rows = query[i:i + row_chunk], key[i:i + row_chunk], value[i:i + row_chunk]
            m_rows = mask[i:i + row_chunk] if per_row_mask else mask
            out.append(torch.cat([
                self._attend_rows(q_rows[:, j:j + token_chunk], k_rows, v_rows,
                                  m_rows[:, j:j + token_chunk] if per_token_mask else m_rows, scale)
                for j in range(0, n_q, token_chunk)
            ], dim=1))
        return torch.cat(out)

    @staticmethod
    def _fused(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        """softmax(scale·QKᵀ + mask)·V without a probability tensor (scores in FP32, as below)."""
        dtype = query.dtype
        # [1, rows, tokens, dim]: with a head axis the CPU flash kernel runs (3-D inputs take the
        # math fallback, which materialises the whole score tensor)
        out = F.scaled_dot_product_attention(query.float()[None], key.float()[None], value.float()[None],
                                             attn_mask=None if mask is None else mask.float()[None], scale=scale)
        return out[0].to(dtype)

    def _attend_rows(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        dtype = query.dtype
        q32, k32 = query.float(), key.float()
        # scale·QKᵀ (+ mask) in one baddbmm, as diffusers' get_attention_scores, but always FP32
        if mask is None:
            bias = torch.empty(q32.shape[0], q32.shape[1], k32.shape[1], dtype=torch.float32, device=q32.device)
            beta = 0.0
        else:
            bias, beta = mask.float(), 1.0
        scores = torch.baddbmm(bias, q32, k32.transpose(-1, -2), beta=beta, alpha=scale)
        del bias
        probs = scores.softmax(dim=-1)
        del scores
        probs = self._maybe(self.probs_quantizer, probs).to(dtype)
        return torch.bmm(probs, value)
