"""Distributed glue, installed as `lingshu_fast.parallel`: torchrun env -> Megatron-Core parallel_state."""
