"""`lingshu-fast plan`: which (TP, PP, DP, virtual stages, checkpointing) layouts fit the GPUs, and
how fast each would run, from the recipe and the model's config alone. A MODEL, not a measurement:
memory from this code's tensor inventories (checked against measured lifetimes in the tests),
time from FLOPs at an assumed efficiency plus communication over stated link bandwidths."""
