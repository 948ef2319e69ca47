"""The validation split: deterministic, disjoint, sized as asked; bad sizes are one clear line."""
import pytest

from toolkit.data.split import DatasetSubset, build_split_dataset, split_indices
from toolkit.errors import UserError


def test_split_is_a_disjoint_cover_fixed_by_the_seed():
    train, val = split_indices(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == list(range(100))
    assert split_indices(100, 0.1, seed=3) == (train, val)
    assert split_indices(100, 0.1, seed=4)[1] != val
    assert len(split_indices(100, 7)[1]) == 7
    assert len(split_indices(10, 0.01)[1]) == 1  # a fraction never rounds down to no validation at all


@pytest.mark.parametrize("size", [1.0, -1, 100, 1.5, "10", True])
def test_bad_val_size_is_a_user_error(size):
    with pytest.raises(UserError, match="val_size"):
        split_indices(100, size)


def test_split_datasets_on_real_data(tokenizer):
    kwargs = dict(tokenizer=tokenizer, source="champ", map_fn="champ", template="chatml", max_length=128)
    train = build_split_dataset("train", val_size=20, **kwargs)
    val = build_split_dataset("val", val_size=20, **kwargs)
    assert isinstance(train, DatasetSubset) and len(val) == 20 and len(train) + len(val) == 266  # 4 of 270 have no trained token in 128
    assert not set(train.indices) & set(val.indices)
    assert val.lengths == [len(val[i]["input_ids"]) for i in range(len(val))]
    assert build_split_dataset("val", val_size=0, val_source="champ", **kwargs).lengths == \
        build_split_dataset("train", val_size=0, **kwargs).lengths  # a separate set; training keeps all
    with pytest.raises(UserError, match="val_size is 0 and val_data_source is None"):
        build_split_dataset("val", val_size=0, **kwargs)
