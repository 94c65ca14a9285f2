"""Activation memory of one micro-batch on one pipeline rank: what each layer keeps for backward, by
checkpointing policy, and the peak over the backward pass. A MODEL of this code's tensors.

Inventories (elements per token of the LLM / per patch of the ViT; widths per TP rank), read from what
autograd saves in language.py / vision.py and checked by tests/test_plan_activations.py, which measures
live tensor bytes at the real 7B widths with a tensor-lifetime tracker (plan/tracker.py):

decoder layer, its input included (H hidden, q/kv query/KV width, I MLP width, Hr = H/tp under
sequence parallelism else H; the column-parallel inputs n1, n2 are saved gathered, at full H):
  fused (CUDA: Liger RMSNorm/SwiGLU/RoPE, varlen attention; bf16)
    none       x, h (2 Hr) + n1, n2 (2 H) + rotated q, k, contiguous v, output (2q + 2kv) + a, b, silu*up (3 I)
    selective  ... + qkv (q + 2kv) + output (q) + gate_up (2 I)             (the attention core's copies
               are no bigger than qkv here: on this backend selective frees the MLP activation output)
  reference (CPU: the PyTorch ops of ops.py, SDPA; fp32)
    none       x, rms y, n1, h, rms y, n2 (4 Hr + 2 H) + qkv, rotated q, k, SDPA out, cat (4q + 3kv)
               + gate_up, silu, silu*up (4 I)
    selective  ... + qkv, cat (2q + 2kv) + gate_up (2 I)
  full         x only (Hr)
ViT block (D width, Iv MLP width, widths / vt when the tower is TP-sharded; no sequence parallelism):
  fused        none 4 D + 4 D/vt + 3 Iv/vt; selective 4 D + 4 D/vt + 2 Iv/vt
  reference    none 6 D + 7 D/vt + 4 Iv/vt; selective 6 D + 4 D/vt + 2 Iv/vt
  full         D
plus per-token/-patch extras: the attention's log-sum-exp (4 bytes per head) and the norms' 1/rms.

Peak: backward frees layer by layer, so the peak is the largest of (a) the head's backward (all saved
tensors + the fused-CE workspace), (b) each decoder layer's backward (saved tensors of the layers
below it and of the ViT, the layer's recompute under full/selective, and its backward transient: the
down projection's weight gradient [H, I], input gradient [T, I] and two gradient streams [T, H]),
(c) the embedding's weight gradient, (d) each ViT block's backward (likewise). Micro-batches in flight
(pipeline) add their saved tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

from lingshu_fast.model.recompute import layer_policy

BACKENDS = {"fused": 2, "reference": 4}  # activation bytes: bf16 on CUDA, fp32 on CPU


@dataclass(frozen=True)
class Widths:
    """The widths that size activations, from a Qwen2.5-VL config (whole model, not per rank)."""
    hidden: int
    q: int
    kv: int
    inter: int
    heads: int
    head_dim: int
    vocab: int
    vit_dim: int
    vit_inter: int
    vit_heads: int
    merge: int
    out_hidden: int
    patch_values: int

    @classmethod
    def of(cls, hf_config) -> "Widths":
        t, v = hf_config.text_config, hf_config.vision_config
        hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return cls(t.hidden_size, t.num_attention_heads * hd, t.num_key_value_heads * hd, t.intermediate_size,
                   t.num_attention_heads, hd, t.vocab_size, v.hidden_size, v.intermediate_size, v.num_heads,
                   v.spatial_merge_size, v.out_hidden_size, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)


@dataclass(frozen=True)
class Split:
    """How one rank holds the model: TP size, sequence parallelism, the ViT's own TP (1: replicated)."""
    tp: int = 1
    sp: bool = False
    vit_tp: int = 1

    @property
    def residual_div(self) -> int:
        return self.tp if self.sp and self.tp > 1 else 1


def decoder_layer_bytes_per_token(w: Widths, policy: str, backend: str, s: Split = Split()) -> float:
    """Bytes one decoder layer keeps for backward per token of the micro-batch, on one rank."""
    b, tp = BACKENDS[backend], s.tp
    hr = w.hidden / s.residual_div
    if policy == "full":
        return hr * b
    if backend == "fused":
        hidden_terms = 2 * hr + 2 * w.hidden
        attention = (2 * w.q + 2 * w.kv) / tp
        mlp = (3 if policy == "none" else 2) * w.inter / tp
        extras = 2 * 4 / s.residual_div + (4 * w.heads / tp if policy == "none" else 0)  # 1/rms, lse
    else:
        hidden_terms = 4 * hr + 2 * w.hidden
        attention = ((4 * w.q + 3 * w.kv) if policy == "none" else (2 * w.q + 2 * w.kv)) / tp
        mlp = (4 if policy == "none" else 2) * w.inter / tp
        extras = 2 * 4 / s.residual_div + (4 * w.heads / tp if policy == "none" else 0)
    return (hidden_terms + attention + mlp) * b + extras


def vit_block_bytes_per_patch(w: Widths, policy: str, backend: str, s: Split = Split()) -> float:
    """Bytes one ViT block keeps for backward per image patch, on one rank."""
    b, vt, d = BACKENDS[backend], s.vit_tp, w.vit_dim
    if policy == "full":
        return d * b
    if backend == "fused":
        elems = 4 * d + 4 * d / vt + (3 if policy == "none" else 2) * w.vit_inter / vt
    else:
        elems = 6 * d + (7 if policy == "none" else 4) * d / vt + (4 if policy == "none" else 2) * w.vit_inter / vt
    lse = 4 * w.vit_heads / vt if policy == "none" else 0
    return elems * b + lse + 2 * 4


def decoder_transient_bytes(w: Widths, tokens: int, policy: str, backend: str, s: Split = Split()) -> float:
    """Live only during one layer's backward: the down projection's weight and input gradients, two
    gradient streams, and what the layer's policy recomputes then."""
    b, tp = BACKENDS[backend], s.tp
    hr = w.hidden / s.residual_div
    base = (w.hidden * w.inter / tp + tokens * w.inter / tp + 2 * tokens * hr) * b
    if policy == "full":  # the layer's forward runs again: its saved tensors come back
        base += tokens * (decoder_layer_bytes_per_token(w, "none", backend, s) - hr * b)
    elif policy == "selective":  # silu(gate) * up recomputed for the down projection's weight gradient
        base += tokens * w.inter / tp * b
    return base


def vit_transient_bytes(w: Widths, patches: int, policy: str, backend: str, s: Split = Split()) -> float:
    b, vt, d = BACKENDS[backend], s.vit_tp, w.vit_dim
    base = (d * w.vit_inter / vt + patches * w.vit_inter / vt + 2 * patches * d) * b
    if policy == "full":
        base += patches * (vit_block_bytes_per_patch(w, "none", backend, s) - d * b)
    elif policy == "selective":
        base += patches * w.vit_inter / vt * b
    return base


def merger_bytes_per_patch(w: Widths, backend: str, s: Split = Split()) -> float:
    """The merger's saved tensors (its input, the norm, fc1's output and GELU's) and the ViT rotary
    tables (fp32 cos/sin in window order), per patch."""
    b, vt, d = BACKENDS[backend], s.vit_tp, w.vit_dim
    norm = 3 * d if backend == "reference" else 2 * d
    rotary = 2 * (d // w.vit_heads) * 4
    return (norm + 2 * d / vt) * b + rotary


def head_bytes_per_token(w: Widths, backend: str, s: Split = Split()) -> float:
    """The final norm's saved tensors (the last layer's output, the normed states the loss keeps,
    gathered to full width under sequence parallelism) and the loss's log-sum-exp, per token."""
    b, hr = BACKENDS[backend], w.hidden / s.residual_div
    elems = (2 * hr if backend == "reference" else hr) + w.hidden
    return elems * b + 4 + 4


def step_inputs_bytes(w: Widths, tokens: int, patches: int, backend: str) -> float:
    """The micro-batch itself on the device: ids, labels, 3-D positions (int64), pixel values, and the
    M-RoPE cos/sin tables every layer shares."""
    b = BACKENDS[backend]
    return tokens * (8 + 8 + 3 * 8) + patches * w.patch_values * b + 2 * tokens * w.head_dim * b


@dataclass(frozen=True)
class RankPieces:
    """What one pipeline rank runs for each micro-batch."""
    layer_ids: tuple[int, ...]  # global decoder-layer indices
    first: bool  # holds the ViT and the embeddings
    last: bool  # holds the final norm and the head


def rank_activation_peak(w: Widths, tokens: int, patches: int, pieces: RankPieces, *, policy: str, every_k: int,
                         backend: str, split: Split, vit_depth: int, head_workspace: float,
                         embed_grad: float = 0.0, in_flight: float = 1.0) -> tuple[float, float]:
    """(activation bytes, loss workspace bytes) at this rank's peak for one step; `in_flight` micro-
    batches' saved tensors are live at once (the pipeline schedule's count, 1 without PP)."""
    llm = [tokens * decoder_layer_bytes_per_token(w, layer_policy(policy, i, every_k), backend, split)
           for i in pieces.layer_ids]
    vit = [patches * vit_block_bytes_per_patch(w, layer_policy(policy, j, every_k), backend, split)
           for j in range(vit_depth)] if pieces.first and patches else []
    inputs = step_inputs_bytes(w, tokens, patches if pieces.first else 0, backend)
    vit_saved = sum(vit) + (patches * merger_bytes_per_patch(w, backend, split) if vit else 0.0)
    head = tokens * head_bytes_per_token(w, backend, split) if pieces.last else 0.0
    saved = inputs + vit_saved + sum(llm) + head
    phases = [(saved, head_workspace if pieces.last else 0.0)]
    for k, i in enumerate(pieces.layer_ids):
        extra = decoder_transient_bytes(w, tokens, layer_policy(policy, i, every_k), backend, split)
        phases.append((inputs + vit_saved + sum(llm[:k + 1]) + extra, 0.0))
    if pieces.first:  # the embedding's weight gradient, made once the decoder's backward is done
        phases.append((inputs + vit_saved + embed_grad, 0.0))
    for j in range(len(vit)):
        extra = vit_transient_bytes(w, patches, layer_policy(policy, j, every_k), backend, split)
        phases.append((inputs + sum(vit[:j + 1]) + extra, 0.0))
    act, workspace = max(phases, key=lambda p: p[0] + p[1])
    return act + max(0.0, in_flight - 1.0) * (saved - head), workspace
