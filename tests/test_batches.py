import torch

import bigbatch as bb


def test_split_nested_batch_keeps_structure_and_non_tensor_leaves():
    batch = {"x": torch.arange(10).view(5, 2), "meta": ("name", torch.arange(5)), "flag": True}
    pieces = bb.split_batch(batch, 2)
    assert [bb.batch_size(p) for p in pieces] == [2, 2, 1]
    assert pieces[2]["flag"] is True and pieces[2]["meta"][0] == "name"
    assert torch.equal(torch.cat([p["x"] for p in pieces]), batch["x"])
    assert pieces[0]["x"].data_ptr() == batch["x"].data_ptr()  # views, not copies
