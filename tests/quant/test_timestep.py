"""TimestepIndex: exact / nearest lookup of the calibrated schedule (docs/methods.md §1.7)."""
import pytest
import torch

from diffquant.errors import ConfigError, DiffquantError
from diffquant.quant import TimestepIndex

SCHEDULE = [951, 901, 851, 801]


def test_exact_lookup_for_ints_and_tensors():
    index = TimestepIndex(SCHEDULE)
    assert index.num_steps == 4
    assert [index.index_of(t) for t in SCHEDULE] == [0, 1, 2, 3]
    assert index.select(torch.tensor([851, 851])) == 2 and index.index == 2
    assert index.index_of(torch.tensor(901.0)) == 1


def test_unknown_timestep_raises():
    index = TimestepIndex(SCHEDULE)
    with pytest.raises(DiffquantError, match="not in the calibrated schedule"):
        index.index_of(900)


def test_nearest_lookup():
    index = TimestepIndex(SCHEDULE, lookup="nearest")
    assert index.index_of(900) == 1
    assert index.index_of(1000) == 0
    assert index.index_of(0) == 3
    assert index.index_of(876) == 1  # tie between 901 and 851: the first entry wins


def test_batch_must_share_one_timestep():
    index = TimestepIndex(SCHEDULE)
    with pytest.raises(DiffquantError, match="one timestep per denoiser call"):
        index.index_of(torch.tensor([951, 901]))
    with pytest.raises(DiffquantError):
        index.index_of(torch.tensor([], dtype=torch.long))


def test_empty_schedule_is_a_shared_table():
    index = TimestepIndex()
    assert index.num_steps == 1 and index.index_of(123) == 0


def test_round_trip_and_validation():
    index = TimestepIndex(SCHEDULE, lookup="nearest")
    copy = TimestepIndex.from_dict(index.to_dict())
    assert copy.timesteps == SCHEDULE and copy.lookup == "nearest"
    index.select(801)
    index.set_timesteps([10, 5])
    assert index.index == 0 and index.timesteps == [10, 5]
    with pytest.raises(ConfigError):
        TimestepIndex(SCHEDULE, lookup="closest")
