"""Ready-made `bigbatch check` cases, one per framework: copy one and put your model, data and loss in.

    bigbatch check bigbatch.check.adapters.plain_loop:case       # the classic loss / accumulation_steps loop
    bigbatch check bigbatch.check.adapters.bigbatch_loop:case    # bb.Accumulator: always exact
    bigbatch check bigbatch.check.adapters.accelerate_loop:case  # Accelerate's accumulate()
    bigbatch check bigbatch.check.adapters.lightning_loop:case   # Lightning's accumulate_grad_batches
    bigbatch check bigbatch.check.adapters.hf_trainer:case       # the Hugging Face Trainer on a GPT-2 from a config

Each module trains a tiny model for a few optimizer steps on one fixed logical
batch (`steps` epochs, each one optimizer step) and describes model, data, loss
and optimizer in a `bb.CheckCase`, so a miss comes with its diagnosis.
`toy.py` holds the small regression model and data the first four share.
"""
