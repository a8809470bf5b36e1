"""The global-order sampler and the device loader."""
import pytest
import torch
from torch.utils.data import TensorDataset

from trainfleet.engine.data import GlobalOrderSampler, resolve_batch_sizes
from trainfleet.utils.errors import UsageError


def rank_batches(n, global_batch, world, rank, epoch=0, **kw):
    sampler = GlobalOrderSampler(n, global_batch, world, rank, seed=7, **kw)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    per = global_batch // world
    assert len(indices) == len(sampler)
    return [indices[i:i + per] for i in range(0, len(indices), per)]


@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_holds_the_same_samples_at_any_world_size(world):
    single = rank_batches(64, 8, 1, 0)
    shards = [rank_batches(64, 8, world, r) for r in range(world)]
    for b, batch in enumerate(single):
        assert sum((shards[r][b] for r in range(world)), []) == batch


def test_order_depends_on_seed_and_epoch_only():
    assert rank_batches(32, 8, 1, 0, epoch=0) != rank_batches(32, 8, 1, 0, epoch=1)
    assert rank_batches(32, 8, 2, 1, epoch=3) == rank_batches(32, 8, 2, 1, epoch=3)
    epoch = sum(rank_batches(32, 8, 1, 0, epoch=2), [])
    assert sorted(epoch) == list(range(32))


def test_partial_last_batch_is_padded_evenly_for_training():
    shards = [sum(rank_batches(10, 4, 2, r), []) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6  # 3 global batches of 4, the last one padded
    assert set(shards[0] + shards[1]) == set(range(10))


def test_uneven_tail_without_padding_for_evaluation():
    samplers = [GlobalOrderSampler(10, 4, 2, r, shuffle=False, even=False) for r in range(2)]
    seen = [list(s) for s in samplers]
    assert sorted(seen[0] + seen[1]) == list(range(10))
    assert [len(s) for s in samplers] == [len(x) for x in seen] == [5, 5]


def test_drop_last():
    sampler = GlobalOrderSampler(10, 4, 2, 0, drop_last=True)
    assert len(list(sampler)) == len(sampler) == 4


def test_resume_start_skips_consumed_global_batches():
    full = rank_batches(32, 8, 2, 1)
    sampler = GlobalOrderSampler(32, 8, 2, 1, seed=7)
    sampler.set_epoch(0, start=16)
    assert list(sampler) == sum(full[2:], [])


@pytest.mark.parametrize("batch, global_batch, world, expected", [
    (None, None, 2, (1, 2)), (4, None, 2, (4, 8)), (None, 8, 4, (2, 8)), (2, 8, 4, (2, 8)),
])
def test_batch_sizes(batch, global_batch, world, expected):
    assert resolve_batch_sizes(batch, global_batch, world) == expected


def test_batch_size_errors_give_a_hint():
    with pytest.raises(UsageError, match="global batch size 10 does not divide over 4 workers.*HINT: use a multiple of 4, e.g. 8 or 12"):
        resolve_batch_sizes(None, 10, 4)
    with pytest.raises(UsageError, match="disagree"):
        resolve_batch_sizes(3, 8, 4)


def test_loader_advances_epochs_and_keeps_position():
    from trainfleet.engine.engine import Engine

    engine = Engine(strategy="single", seed=3)
    dataset = TensorDataset(torch.arange(12).float(), torch.arange(12))
    loader = engine.dataloader(dataset, global_batch_size=4)
    first = [y.tolist() for _, y in loader]
    second = [y.tolist() for _, y in loader]
    assert first != second and sorted(sum(first, [])) == list(range(12)) == sorted(sum(second, []))
    assert loader.epoch == 1
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state == {"seed": 3, "epoch": 2, "consumed": 4, "global_batch_size": 4, "num_samples": 12}
    rest = [y.tolist() for _, y in it]
    fresh = engine.dataloader(dataset, global_batch_size=4)
    fresh.load_state_dict(state)
    assert [y.tolist() for _, y in fresh] == rest
    engine.close()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_starting_an_epoch_leaves_the_global_rng_alone(num_workers):
    """DataLoader draws its workers' base seed when an iterator starts: from the global RNG unless
    it has a generator. The engine gives it one, seeded per epoch, so a resumed run draws the
    same dropout masks as an uninterrupted one, and workers' seeds depend on the epoch only."""
    from trainfleet.engine.engine import Engine

    engine = Engine(strategy="single", seed=3)
    dataset = TensorDataset(torch.arange(8).float(), torch.arange(8))
    loader = engine.dataloader(dataset, global_batch_size=4, num_workers=num_workers)
    before = torch.get_rng_state()
    for epoch in range(2):
        next(iter(loader))
        assert torch.equal(torch.get_rng_state(), before), f"epoch {epoch} drew from the global RNG"
    seed = loader.loader.generator.initial_seed()
    other = engine.dataloader(dataset, global_batch_size=4, num_workers=num_workers)
    other.load_state_dict({**loader.state_dict(), "epoch": 1, "consumed": 0})
    next(iter(other))
    assert other.loader.generator.initial_seed() == seed  # same epoch, same workers' seed
    engine.close()
