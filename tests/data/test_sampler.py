from types import SimpleNamespace

from toolkit.data.samplers import LengthGroupedSampler


def test_length_grouped_batches_cover_all_and_are_homogeneous():
    lengths = [(i * 37) % 300 + 10 for i in range(100)]
    sampler = LengthGroupedSampler(SimpleNamespace(lengths=lengths), batch_size=4, seed=3, mega_batch_mult=5)
    order = list(sampler)
    assert sorted(order) == list(range(100)) and len(sampler) == 100
    def spread(order):
        batches = [order[i:i + 4] for i in range(0, 100, 4)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread(order) < spread(list(range(100))) / 3  # in file order, batches of 4 spread by ~150
    again = LengthGroupedSampler(SimpleNamespace(lengths=lengths), batch_size=4, seed=3, mega_batch_mult=5)
    assert list(again) == order  # same seed and epoch, same order (resume)
    again.set_epoch(1)
    assert list(again) != order


def test_ranks_split_each_global_batch(monkeypatch):
    import toolkit.data.samplers as samplers
    lengths = list(range(10, 70))
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(samplers, "get_dist_info", lambda r=rank: (r, 2))
        per_rank.append(list(LengthGroupedSampler(SimpleNamespace(lengths=lengths), batch_size=3, seed=0)))
    assert sorted(per_rank[0] + per_rank[1]) == list(range(60))
    assert not set(per_rank[0]) & set(per_rank[1])
