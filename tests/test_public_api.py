import bigbatch as bb


def test_every_public_name_exists():
    for name in bb.__all__:
        assert hasattr(bb, name), name


def test_design_names_are_public():
    design = [
        "Accumulator",
        "LossSum",
        "token_cross_entropy",
        "scale_lr",
        "verify",
        "plan",
        "chunked_cross_entropy",
        "convert_batchnorm",
        "guard",
        "NoiseStats",
        "causal_lm_loss",
        "BatchLoss",
        "info_nce",
        "multiple_negatives_ranking_loss",
    ]
    for name in design:
        assert name in bb.__all__
