"""Check any trainer's gradient accumulation against its own full batch, and name the mistake.

    report = bb.check_accumulation(train, logical_batch_size=8)     # train(micro_batch_size, accumulation_steps)
    print(report.table()); assert report.passed

The command line runs the same: `bigbatch check MODULE:FUNCTION --logical-batch-size 8`.
Ready-made cases for the Hugging Face Trainer, Accelerate, Lightning, a plain
loop and bigbatch itself live in `bigbatch.check.adapters` (docs/check.md).
"""

from .case import CheckCase, Split, TrainFn
from .report import CheckReport, Diagnosis, SplitResult
from .run import check_accumulation

__all__ = ["CheckCase", "CheckReport", "Diagnosis", "Split", "SplitResult", "TrainFn", "check_accumulation"]
