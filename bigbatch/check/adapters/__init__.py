"""Ready-made `bigbatch check` cases, one per framework: copy one and put your model, data and loss in.

    bigbatch check bigbatch.check.adapters.plain_loop:case       # the classic loss / accumulation_steps loop
    bigbatch check bigbatch.check.adapters.bigbatch_loop:case    # bb.Accumulator: always exact
    bigbatch check bigbatch.check.adapters.bigbatch_loop:lm_case # the same on the tiny GPT-2
    bigbatch check bigbatch.check.adapters.accelerate_loop:case  # Accelerate's accumulate()
    bigbatch check bigbatch.check.adapters.lightning_loop:case   # Lightning's accumulate_grad_batches
    bigbatch check bigbatch.check.adapters.hf_trainer:case       # the Hugging Face Trainer on a GPT-2 from a config
    bigbatch check bigbatch.check.adapters.hf_trainer:fixed      # the same with model.loss_type = "ForCausalLM"

Each module trains a tiny model for a few optimizer steps on one fixed logical
batch (`steps` epochs, each one optimizer step) and describes model, data, loss
and optimizer in a `bb.CheckCase`, so a miss comes with its diagnosis.
`toy.py` holds the small regression problem of the plain and bigbatch loops;
`tiny_lm.py` the random GPT-2 and token sequences of the framework adapters
(and of `bigbatch_loop:lm_case`).
"""
