"""What a training step costs in memory, and choosing the setup that fits.

accounting.py                bytes of parameters, gradients, optimizer state, saved activations
activation_checkpointing.py  checkpoint_blocks: recompute each block's activations in backward
planner/                     bb.plan: the fastest micro-batch, checkpointing and compile that fit
"""
