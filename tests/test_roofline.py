"""bench/roofline.py: the arithmetic of the roofline model on cases small enough to count by hand.

The model's predictions are only as good as its counts: these pin the wave L2 model, the launch order
it reads, the forward's FLOPs and bytes from the kernel's own tiles and split planner, Liger's chunk
rule and the roofline max. Exact equality: every figure is an integer count or a ratio of them.
"""
import pytest
import roofline


def test_grouped_order_is_the_kernels_super_tile_order():
    """4 row blocks x 3 vocabulary tiles in super-tiles of 2 row blocks: row blocks vary fastest inside
    a group, then the vocabulary tile, then the group (as _flce_triton._grouped)."""
    assert list(roofline.grouped_order(4, 3, 2)) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2),
                                               (2, 0), (3, 0), (2, 1), (3, 1), (2, 2), (3, 2)]
    assert list(roofline.grouped_order(3, 2, 2)[4:]) == [(2, 0), (2, 1)]  # the ragged last group


def test_wave_model_counts_panels_per_wave_with_and_without_carry_over():
    """Waves of 4 programs over the order above, a panel = 1 byte, b panel = 100 bytes.
    Without carry-over: wave 1 {a0,a1,b0,b1}, wave 2 {a0..a3, b0,b2}, wave 3 {a2,a3,b1,b2}: 2a+2b,
    4a+2b, 2a+2b = 8 + 600 = 608. With an L2 large enough to
    carry a wave: wave 2 pays only a2, a3, b2 and wave 3 only b1: 4a + 4b = 404."""
    order = roofline.grouped_order(4, 3, 2)
    assert roofline.wave_panel_bytes(order, 4, 0.0, 1.0, 100.0) == 608.0
    assert roofline.wave_panel_bytes(order, 4, 1e9, 1.0, 100.0) == 404.0


def test_lingshu_forward_counts_from_its_tiles():
    """N=256, H=64, V=256 bf16 on the H100 (128x128 tiles): 2 row blocks x 2 tiles; the planner picks
    2 splits (4 programs fill more of the 132 SMs than 2), one wave. FLOPs 2*256*256*64 = 8,388,608;
    bytes: 2 hidden panels (128*64*2 = 16,384 each) + 2 weight panels (1 tile * 128*64*2) + lse and
    target partials (2 arrays * 2 splits * 256 rows * 4 B, written and read) = 73,728. Memory-bound."""
    card = roofline.CARDS["H100"]
    cost = roofline.lingshu_flce_forward(card, 256, 64, 256)
    assert cost.flops == 8_388_608
    assert cost.hbm_bytes == 73_728
    assert cost.ms == pytest.approx(1e3 * 73_728 / 3.35e12)


def test_liger_chunking_and_roofline_max():
    """Liger's chunk at the 7B head: ceil(152064 / 3584) = 43, ceil(16384 / 43) = 382 -> 512 rows, 32
    chunks. At N=2, H=4, V=8: ceil(8 / 4) = 2, ceil(2 / 2) = 1 -> chunks of 1 row; each chunk's logits
    GEMM is 2*1*8*4 = 64 FLOPs reading W (32) + h (4) and writing logits (8) elements, bf16; the kernel
    time is the larger of the compute and memory times."""
    assert roofline.liger_chunk_rows(16384, 3584, 152064) == 512
    card = roofline.CARDS["A100"]
    cost = roofline.liger_flce(card, 2, 4, 8)
    logits = cost.parts[1]
    assert logits.name == "logits" and logits.flops == 64 and logits.hbm_bytes == (32 + 4 + 8) * 2
    assert logits.ms == pytest.approx(1e3 * max(64 / 312e12, 88 / 2.039e12))
    assert cost.flops == 2 * 3 * 64  # two chunks of logits, grad_input, grad_weight: Liger never recomputes


def test_table_says_it_is_a_model():
    text = roofline.table(0.1)
    assert text.startswith("MODEL:") and "not measurements" in text
    assert all(card in text for card in ("A100", "H100", "H200"))


def test_lingshu_three_pass_counts_from_its_tiles():
    """N=256, H=64, V=256 bf16 on the H100 (128x128 tiles, 128-wide grad tiles): one row stripe of 256 rows
    (the planner's 640 capped at N), 2 row blocks x 2 vocabulary tiles, 1 H tile. HBM bytes by hand:
    zero dE 256*64*2 = 32,768; logits: 2 hidden + 2 weight panels of 128*64*2 (65,536) + X written
    (256*256*2) + 3 partials (3*2*256*4) = 202,752; lse merge: 2 partials read + 3 vectors = 7,168;
    dlogits: X read + written (keep 1) + max partial = 264,192; dW: 2 X panels (256*128*2) + 1 hidden panel
    (256*128*2) + grad_weight written once (first stripe) = 229,376; dE: 2 X panels (128*256*2) + 1
    weight panel (256*128*2) + its rows = 229,376; backward's scale of dE and dW: read + write = 131,072.
    Three GEMMs of 2*256*256*64 FLOPs: the logits are never recomputed."""
    card = roofline.CARDS["H100"]
    cost = roofline.lingshu_flce_three_pass(card, 256, 64, 256)
    fwd, bwd = cost.parts
    assert [c.hbm_bytes for c in fwd.parts] == [32_768, 202_752, 7_168, 264_192, 229_376, 229_376]
    assert bwd.hbm_bytes == 131_072
    assert cost.flops == 3 * 2 * 256 * 256 * 64


def test_row_stripe_keeps_the_dw_accumulation_compute_bound():
    """The planner's rule on the modelled cards: each stripe's grad_weight read + write (2 x 2 bytes per
    element) takes no longer than its dW GEMM (2 x rows FLOPs per element) at the card's peaks."""
    for card in (roofline.CARDS["A100"], roofline.CARDS["H100"]):
        rows = roofline.tk.plan_row_stripe(16384, 128, card.arch)
        assert rows % 128 == 0
        assert 2 * rows / (card.tc_tflops * 1e12) >= 4 / (card.hbm_tb_s * 1e12) * 0.999
        assert 2 * (rows - 128) / (card.tc_tflops * 1e12) < 4 / (card.hbm_tb_s * 1e12)  # the shortest such


def test_row_stripe_doubles_for_an_fp32_main_gradient():
    """Adding into an fp32 main gradient moves 2 x 4 bytes per element and stripe instead of 2 x 2: the
    shortest compute-bound stripe then has twice the rows (the same rule as above, twice the bytes)."""
    for card in (roofline.CARDS["A100"], roofline.CARDS["H100"]):
        rows = roofline.tk.plan_row_stripe(1 << 20, 128, card.arch, 2)
        assert 2 * rows / (card.tc_tflops * 1e12) >= 8 / (card.hbm_tb_s * 1e12) * 0.999
        assert 2 * (rows - 128) / (card.tc_tflops * 1e12) < 8 / (card.hbm_tb_s * 1e12)


def test_three_pass_into_main_grad_counts_its_read_add_write():
    """The same N=256, H=64, V=256 case with `main_grad`: the only stripe reads and writes the fp32 main
    gradient (256*64*8 = 131,072 instead of writing 32,768 bf16 bytes) and backward scales dE alone
    (65,536); no grad_weight is held, so the extra memory drops by V*H*2."""
    card = roofline.CARDS["H100"]
    fwd, bwd = roofline.lingshu_flce_three_pass(card, 256, 64, 256, main_grad=True).parts
    assert fwd.parts[4].hbm_bytes == 229_376 - 32_768 + 131_072
    assert bwd.hbm_bytes == 65_536
    n, h, v = 256, 64, 256  # one stripe of N rows either way: only grad_weight differs
    assert roofline.lingshu_three_pass_memory_gb(n, h, v) - roofline.lingshu_three_pass_memory_gb(
        n, h, v, main_grad=True) == pytest.approx(v * h * 2 / 1e9)


def test_in_the_trainer_the_head_meets_its_peers_time_and_cce_memory():
    """The fused CE's targets at the 7B head (H100 model), where the trainer needs the head's gradient:
    in its fp32 main gradient: filtering off no slower than Liger, filtering on no slower than CCE, and
    less extra memory than CCE (whose bf16 grad_weight is held until the grad buffer's hook has run)."""
    s, h100 = roofline.FLCE_SHAPE, roofline.CARDS["H100"]
    off, on = roofline.trainer_rows(h100, 1.0, **s), roofline.trainer_rows(h100, 0.1, **s)
    ours = "lingshu 3-pass into main_grad"
    assert off[ours].ms <= off["liger + hook"].ms and off[ours].ms <= roofline.liger_flce(h100, **s).ms
    assert on[ours].ms <= on["cce + hook"].ms
    memory = roofline.trainer_memory_gb(**s)
    assert memory[ours] <= memory["cce + hook"] and memory["lingshu 4-pass into main_grad"] <= memory["cce + hook"]
