"""Loss functions built for accumulation: each is exact however the batch is split.

    cross_entropy.py          token cross-entropy as a LossSum (summed over the tokens that count)
    chunked_cross_entropy.py  an LM head and its cross-entropy that never hold all the logits
    causal_lm_loss.py         the loss of a Hugging Face causal LM, per valid token
    info_nce.py               InfoNCE and multiple-negatives ranking (in-batch negatives)
    batch_loss.py             BatchLoss: a loss over the whole logical batch, by representation caching

The loss contract itself (`LossSum`, `LossFn`) is the engine's (engine/loss_sum.py).
"""
