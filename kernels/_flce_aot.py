"""AOT-compile specs of the fused linear cross-entropy's kernels (`_flce_triton.py`): one per kernel,
element type, dot precision, target arch and constexpr variant the launch code (`_flce_launch.py`)
runs at the 7B head, at its tiles, warps and num_stages (kernels/_aot.py compiles and checks them)."""
from __future__ import annotations

import dataclasses
import itertools

from lingshu_fast.kernels._aot import AotSpec
from lingshu_fast.kernels._flce_triton import (
    BWD_CONFIGS,
    FWD_CONFIGS,
    BwdConfig,
    _flce_de_kernel,
    _flce_dlogits_kernel,
    _flce_dw_kernel,
    _flce_fwd_kernel,
    _flce_logits_kernel,
    _flce_softmax_grad_kernel,
    config_key,
    softmax_grad_warps,
)

# ---- AOT specs: the launches of the 7B head ------------------------------------------------------------
H_7B = 3584
V_7B = 152064  # Qwen2.5-VL-7B's vocabulary (config.vocab_size); V/tp for tp in 1, 2, 4, 8 is a multiple of 16
# (element type, dot precision): bf16 training, fp32 with allow_tf32, fp32 without it (torch's default).
AOT_VARIANTS = (("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee"))


def _i32(*names: str) -> dict:
    return {n: "i32" for n in names}


def flce_aot_specs(prefix: str = "flce", variants=AOT_VARIANTS, sumx=(False, True), filters=(False, True),
                   three_pass: bool = True) -> list:
    """One spec per (kernel, element type, dot precision, arch, constexpr variant) that the op launches."""
    specs = []
    for (ty, prec), arch in itertools.product(variants, (80, 90)):
        key = config_key(ty == "fp32", prec)
        f, b = FWD_CONFIGS[(key, arch)], BWD_CONFIGS[(key, arch)]
        dot = dict(DOT_PRECISION=prec, UPCAST=False)
        tag = f"{ty},{prec}"
        for with_sumx in sumx:
            sig = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "labels_ptr": "*i64", "lse_part_ptr": "*fp32",
                   "tgt_part_ptr": "*fp32", "sumx_part_ptr": "*fp32",
                   **_i32("N", "H", "V", "vocab_start", "tiles_per_split", "n_splits", "stride_hn", "stride_wv")}
            consts = dict(BLOCK_N=f.block_n, BLOCK_V=f.block_v, BLOCK_H=f.block_h, WITH_SUMX=with_sumx, **dot)
            specs.append(_spec(f"{prefix}_fwd[{tag},sumx={with_sumx}", _flce_fwd_kernel, sig, consts, f.num_warps,
                               f.num_stages, arch, prec, ("H", "V", "stride_hn", "stride_wv")))
        for flt in filters:
            sig = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "labels_ptr": "*i64", "lse_ptr": "*fp32", "g_ptr": "*fp32",
                   "d_ptr": f"*{ty}", "keep_ptr": "*i8", **_i32("N", "H", "V", "vocab_start", "col0", "stripe_tiles"),
                   "target_coef": "fp32", "smooth_per_class": "fp32", "z2": "fp32", "filter_eps": "fp32",
                   **_i32("stride_hn", "stride_wv", "stride_dn")}
            consts = dict(BLOCK_N=b.block_n, BLOCK_V=b.block_v, BLOCK_H=b.block_h, GROUP=b.group, FILTER=flt, **dot)
            specs.append(_spec(f"{prefix}_bwd_dlogits[{tag},filter={flt}", _flce_dlogits_kernel, sig, consts,
                               b.num_warps, b.stages_dlogits, arch, prec,
                               ("H", "V", "col0", "stride_hn", "stride_wv", "stride_dn")))
        sig = {"d_ptr": f"*{ty}", "h_ptr": f"*{ty}", "kept_rows_ptr": "*i32", "n_kept_ptr": "*i32", "gw_ptr": f"*{ty}",
               **_i32("N", "H", "V", "col0", "stripe_tiles", "stride_dn", "stride_hn", "stride_gwv")}
        consts = dict(BLOCK_N=b.block_n, BLOCK_V=b.block_v, BLOCK_H=b.block_h_out, GROUP=b.group, **dot)
        specs.append(_spec(f"{prefix}_bwd_dw[{tag}", _flce_dw_kernel, sig, {**consts, "ACCUMULATE": False},
                           b.num_warps, b.stages_grad, arch,
                           prec, ("H", "V", "col0", "stride_dn", "stride_hn", "stride_gwv")))
        if ty != "fp32":  # gradient-accumulation fusion: 16-bit inputs add into the fp32 main gradient (both paths)
            specs.append(_spec(f"{prefix}_dw_into_main_grad[{tag}", _flce_dw_kernel, {**sig, "gw_ptr": "*fp32"},
                               {**consts, "ACCUMULATE": True}, b.num_warps, b.stages_grad, arch, prec,
                               ("H", "V", "col0", "stride_dn", "stride_hn", "stride_gwv")))
        sig = {"d_ptr": f"*{ty}", "w_ptr": f"*{ty}", "kept_cols_ptr": "*i32", "n_kept_ptr": "*i32", "gh_ptr": "*fp32",
               **_i32("N", "H", "V", "col0", "stripe_tiles", "stride_dn", "stride_wv", "stride_ghn")}
        specs.append(_spec(f"{prefix}_bwd_de[{tag}", _flce_de_kernel, sig, consts, b.num_warps, b.stages_grad, arch,
                           prec, ("H", "V", "col0", "stride_dn", "stride_wv", "stride_ghn")))
        if three_pass:
            specs += _three_pass_specs(prefix, ty, prec, arch, b, sumx, filters)
    return specs


def _three_pass_specs(prefix, ty, prec, arch, b: BwdConfig, sumx, filters) -> list:
    """The 3-pass path's launches: the logits kernel, the in-place dlogits kernel, dW accumulating across
    row stripes, and dE written in the input dtype (the fp32 variant is the 4-pass one, listed above)."""
    dot = dict(DOT_PRECISION=prec, UPCAST=False)
    tag, specs = f"{ty},{prec}", []
    for with_sumx in sumx:
        sig = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "labels_ptr": "*i64", "x_ptr": f"*{ty}", "max_part_ptr": "*fp32",
               "lse_part_ptr": "*fp32",
               "tgt_part_ptr": "*fp32", "sumx_part_ptr": "*fp32",
               **_i32("N", "H", "V", "vocab_start", "stride_hn", "stride_wv", "stride_xn")}
        consts = dict(BLOCK_N=b.block_n, BLOCK_V=b.block_v, BLOCK_H=b.block_h, GROUP=b.group, WITH_SUMX=with_sumx,
                      **dot)
        specs.append(_spec(f"{prefix}_3p_logits[{tag},sumx={with_sumx}", _flce_logits_kernel, sig, consts,
                           b.num_warps, b.stages_dlogits, arch, prec,
                           ("H", "V", "stride_hn", "stride_wv", "stride_xn")))
    for flt in filters:
        sig = {"x_ptr": f"*{ty}", "max_part_ptr": "*fp32", "labels_ptr": "*i64", "lse_ptr": "*fp32",
               "g_ptr": "*fp32", "keep_ptr": "*i8",
               **_i32("N", "V", "vocab_start"), "target_coef": "fp32", "smooth_per_class": "fp32", "z2": "fp32",
               "filter_eps": "fp32", "stride_xn": "i32"}
        consts = dict(BLOCK_N=b.block_n, BLOCK_V=b.block_v, FILTER=flt)
        spec = _spec(f"{prefix}_3p_softmax_grad[{tag},filter={flt}", _flce_softmax_grad_kernel, sig, consts,
                     softmax_grad_warps(b), 1, arch, prec, ("V", "stride_xn"))
        specs.append(dataclasses.replace(spec, expects_wgmma=False))  # element-wise: no dot
    consts = dict(BLOCK_N=b.block_n, BLOCK_V=b.block_v, BLOCK_H=b.block_h_out, GROUP=b.group, **dot)
    sig = {"d_ptr": f"*{ty}", "h_ptr": f"*{ty}", "kept_rows_ptr": "*i32", "n_kept_ptr": "*i32", "gw_ptr": f"*{ty}",
           **_i32("N", "H", "V", "col0", "stripe_tiles", "stride_dn", "stride_hn", "stride_gwv")}
    specs.append(_spec(f"{prefix}_3p_dw_accumulate[{tag}", _flce_dw_kernel, sig, {**consts, "ACCUMULATE": True},
                       b.num_warps, b.stages_grad, arch, prec,
                       ("H", "V", "col0", "stride_dn", "stride_hn", "stride_gwv")))
    if ty != "fp32":
        sig = {"d_ptr": f"*{ty}", "w_ptr": f"*{ty}", "kept_cols_ptr": "*i32", "n_kept_ptr": "*i32", "gh_ptr": f"*{ty}",
               **_i32("N", "H", "V", "col0", "stripe_tiles", "stride_dn", "stride_wv", "stride_ghn")}
        specs.append(_spec(f"{prefix}_3p_de[{tag}", _flce_de_kernel, sig, consts, b.num_warps, b.stages_grad, arch,
                           prec, ("H", "V", "col0", "stride_dn", "stride_wv", "stride_ghn")))
    return specs


def _spec(name, fn, sig, consts, num_warps: int, num_stages: int, arch: int, prec: str, aligned) -> AotSpec:
    return AotSpec(f"{name},H={H_7B},V={V_7B}/tp,sm{arch}]", fn, {**sig, **{k: "constexpr" for k in consts}},
                   consts, num_warps, num_stages, expects_wgmma=prec != "ieee", aligned_args=aligned,
                   capabilities=(arch,))
