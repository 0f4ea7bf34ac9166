"""Finding what makes accumulation inexact, and the ways out.

verify.py     bb.verify: accumulated against full-batch gradients, with a verdict
probes.py     which layers couple samples or draw random numbers, and whether the loss couples
guard.py      bb.guard: wraps a hand-written loop's optimizer and catches the usual mistakes
batchnorm.py  GhostBatchNorm and convert_batchnorm: BatchNorm made exact, or replaced
"""
