"""The view loader on a real cache (digits, 6 blocks of up to 256, 3 units per epoch).

Every batch is checked against the cache itself: each view of an epoch appears once (less the
drop-last remainder of the tail window), its teacher record is the stored one, its image is the
replay of the stored parameters, and the order is a pure function of (train epoch, start batch)
whatever the number of DataLoader workers or ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.augment import cache_spec
from kdcache.distributed import Ranks
from kdcache.format import open_cache
from kdcache.loader import LoaderConfig, ViewLoader
from kdcache.replay import replay_base, replay_block, view_targets
from kdcache.sources import decode_sample, open_source

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 64
FIELDS = ("images", "target", "labels", "views")
RECORD_FIELDS = ("values", "indices", "tail")


def make_loader(path, *, batch_size=BATCH, ranks=Ranks(), **config) -> ViewLoader:
    cache = open_cache(path)
    m = cache.manifest
    return ViewLoader(
        source=open_source(m.dataset.uri), layout=m.blocks, plan=cache.samples(), spec=cache_spec(m),
        num_classes=m.teacher.num_classes, ranks=ranks, cache=cache, cache_epochs=cache.complete_epochs(),
        config=LoaderConfig(batch_size=batch_size, **config),
    )


def fields(batch) -> dict[str, torch.Tensor]:
    out = {name: getattr(batch, name) for name in FIELDS}
    out.update({name: getattr(batch.record, name) for name in RECORD_FIELDS})
    return out


def assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        fa, fb = fields(a), fields(b)
        for name in fa:
            assert fa[name].dtype == fb[name].dtype and torch.equal(fa[name], fb[name]), f"batch {i}: {name} differs"


class Reference:
    """What each view must be, computed from the cache and the source without the loader:
    the stored record, the replay of the stored parameters, the label and the target."""

    def __init__(self, path):
        self.cache = open_cache(path)
        m = self.cache.manifest
        self.spec, self.layout, self.num_classes = cache_spec(m), m.blocks, m.teacher.num_classes
        self.plan = self.cache.samples()
        self.source = open_source(m.dataset.uri)
        self.blocks: dict[tuple[int, int], dict] = {}
        self.decoded: dict[int, list] = {}

    def images(self, block: int) -> list:
        """The block's decoded images in block order, read by the plan's source indices."""
        if block not in self.decoded:
            members = self.plan["source_index"][self.layout.block_slots(block)]
            self.decoded[block] = [decode_sample(s) for s in self.source.read([int(i) for i in members])]
        return self.decoded[block]

    def block(self, epoch: int, block: int) -> dict:
        if (epoch, block) not in self.blocks:
            stored = self.cache.read_block(epoch, block)
            labels = self.plan["label"][self.layout.block_slots(block)].astype(np.int64)
            stored["views"] = replay_block(self.spec, stored["params"], self.images(block))
            stored["target"] = view_targets(self.spec, stored["params"], labels, self.num_classes)
            stored["labels"] = labels
            self.blocks[epoch, block] = stored
        return self.blocks[epoch, block]

    def check(self, batches: list) -> list[tuple[int, int]]:
        """Assert every view of ``batches`` against the cache; returns the (epoch, slot) of each."""
        seen = []
        cap = self.layout.block_capacity
        for batch in batches:
            assert batch.images.dtype == torch.float32 and batch.images.shape[1:] == (3, self.spec.output_size, self.spec.output_size)
            torch.testing.assert_close(batch.target.sum(-1), torch.ones(len(batch)), rtol=0, atol=1e-6)
            for row, (epoch, slot) in enumerate(batch.views.tolist()):
                block, pos = divmod(slot, cap)
                assert pos < self.layout.sizes[block], f"slot {slot} is padding"
                ref = self.block(epoch, block)
                for name in RECORD_FIELDS:
                    got = getattr(batch.record, name)[row]
                    want = torch.from_numpy(np.ascontiguousarray(ref[name][pos])).to(got.dtype)
                    assert torch.equal(got, want), f"view ({epoch}, {slot}): {name} differs from the cache"
                assert torch.equal(batch.images[row], ref["views"][pos]), f"view ({epoch}, {slot}): image is not the replay"
                assert int(batch.labels[row]) == int(ref["labels"][pos])
                assert torch.equal(batch.target[row], ref["target"][pos])
                seen.append((epoch, slot))
        return seen


@pytest.fixture(scope="module")
def reference(small_cache) -> Reference:
    return Reference(small_cache)


@pytest.fixture(scope="module")
def epoch1(small_cache) -> list:
    """Train epoch 1 with no workers: the sequence the determinism tests compare against."""
    return list(make_loader(small_cache).epoch_batches(1))


def used_slots(reference: Reference) -> set[int]:
    return set(np.flatnonzero(reference.plan["source_index"] >= 0).tolist())


# ---- every view once, and it is the cached view ------------------------------------------------


def test_an_epoch_holds_every_view_once_with_its_cached_record_and_replayed_image(small_cache, reference):
    loader = make_loader(small_cache)
    batches = list(loader.epoch_batches(0))
    assert len(batches) == loader.batches_per_epoch and all(len(b) == BATCH for b in batches)
    seen = reference.check(batches)
    assert {e for e, _ in seen} == {0}
    slots = [s for _, s in seen]
    assert len(set(slots)) == len(slots), "a view appears twice in one epoch"
    assert set(slots) <= used_slots(reference)
    # each window is cut into whole batches and the leftovers pooled into the tail window, whose
    # remainder alone is dropped: 1437 mod 64 views, never more
    missing = used_slots(reference) - set(slots)
    assert len(missing) == 1437 % BATCH == 29


def test_without_drop_last_every_view_appears_and_only_the_padding_repeats(small_cache):
    loader = make_loader(small_cache, drop_last=False)
    batches = list(loader.epoch_batches(0))
    slots = torch.cat([b.views[:, 1] for b in batches]).tolist()
    assert set(slots) == used_slots(Reference(small_cache))
    assert all(len(b) == BATCH for b in batches) and len(batches) == -(-1437 // BATCH)
    assert len(slots) - len(set(slots)) == BATCH - 1437 % BATCH  # the padding of the last batch


def test_views_are_shuffled_across_the_blocks_of_a_window(small_cache, epoch1, reference):
    blocks = [set((b.views[:, 1] // reference.layout.block_capacity).tolist()) for b in epoch1]
    assert max(len(s) for s in blocks) > 1, "every batch comes from one block: no shuffle across blocks"
    first = epoch1[0].views[:, 1].tolist()
    assert first != sorted(first)


# ---- deterministic, resumable, worker-invariant ------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_deterministic_and_resume_gives_the_tail(small_cache, epoch1, workers):
    loader = make_loader(small_cache, num_workers=workers)
    full = list(loader.epoch_batches(1))
    n = loader.batches_per_epoch
    assert len(full) == n == len(epoch1)
    if workers == 0:
        assert_same_batches(full, epoch1)
    else:  # the windows are dealt to the workers, so the order may differ; the views may not
        key = lambda batches: sorted(torch.cat([b.views[:, 1] for b in batches]).tolist())
        assert key(full) == key(epoch1)
    # with 2 workers (16 and 6 batches here): start 1 is due at worker 1, start n-2 comes after
    # worker 1 has run out
    for start in (1, n // 2, n - 2) if workers == 0 else (1, n - 2):
        assert_same_batches(list(loader.epoch_batches(1, start_batch=start)), full[start:])
    assert list(loader.epoch_batches(1, start_batch=n)) == []


def test_a_different_train_epoch_is_a_different_order(small_cache, epoch1):
    epoch3 = list(make_loader(small_cache).epoch_batches(3))  # cache epoch 1 again, reshuffled
    assert (epoch3[0].views[:, 0] == 1).all()
    assert epoch3[0].views[:, 1].tolist() != epoch1[0].views[:, 1].tolist()


def test_deferred_views_finish_to_the_same_images(small_cache, epoch1):
    """defer_finish (GPU runs) yields the uint8 stage; Batch.to() finishes it to the same tensors."""
    loader = make_loader(small_cache, defer_finish=True)
    start = len(epoch1) - 3
    deferred = list(loader.epoch_batches(1, start_batch=start))
    assert deferred and all(b.images is None for b in deferred)
    assert_same_batches([b.to("cpu") for b in deferred], epoch1[start:])


# ---- ranks ----------------------------------------------------------------------------------------


def test_two_ranks_split_each_global_batch_into_halves(small_cache, epoch1):
    halves = [list(make_loader(small_cache, ranks=Ranks(rank=r, world=2)).epoch_batches(1)) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(epoch1)
    for i, whole in enumerate(epoch1):
        a, b = fields(halves[0][i]), fields(halves[1][i])
        assert len(halves[0][i]) == len(halves[1][i]) == BATCH // 2
        for name, tensor in fields(whole).items():
            assert torch.equal(torch.cat([a[name], b[name]]), tensor), f"batch {i}: {name}"
    # and a resumed rank resumes its own half
    late = list(make_loader(small_cache, ranks=Ranks(rank=1, world=2)).epoch_batches(1, start_batch=5))
    assert_same_batches(late, halves[1][5:])


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(small_cache):
    from kdcache.errors import ConfigError

    loader = make_loader(small_cache, batch_size=63, ranks=Ranks(rank=0, world=2))
    with pytest.raises(ConfigError, match="63.*2 ranks"):
        next(loader.epoch_batches(0))


# ---- epochs beyond the cache cycle -----------------------------------------------------------------


@pytest.mark.parametrize("train_epoch", [2, 3])
def test_train_epochs_beyond_the_cache_cycle_through_it(small_cache, reference, train_epoch):
    loader = make_loader(small_cache)
    batches = list(loader.epoch_batches(train_epoch, start_batch=loader.batches_per_epoch - 4))
    seen = reference.check(batches)  # records and images of cache epoch train_epoch mod 2
    assert {e for e, _ in seen} == {train_epoch % 2}


# ---- mixed views -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def funmatch_cache(tmp_path_factory, make_config, helpers):
    path = tmp_path_factory.mktemp("funmatch") / "cache"
    helpers.run_precompute(make_config(path, augmentation="funmatch", epochs=1))
    return path


def test_funmatch_views_mix_with_a_partner_from_the_same_block(funmatch_cache):
    ref = Reference(funmatch_cache)
    assert ref.spec.mix == "mixup"
    loader = make_loader(funmatch_cache)
    batches = list(loader.epoch_batches(0, start_batch=loader.batches_per_epoch - 3))
    ref.check(batches)
    cols = {name: i for i, name in enumerate(ref.cache.manifest.param_fields)}
    cap = ref.layout.block_capacity
    mixed = 0
    for batch in batches:
        for row, (epoch, slot) in enumerate(batch.views.tolist()):
            block, pos = divmod(slot, cap)
            params = ref.block(epoch, block)["params"]
            partner, lam = int(params[pos, cols["mix_partner"]]), float(params[pos, cols["mix_lam"]])
            if partner < 0:  # the odd one out of an odd-sized block
                continue
            mixed += 1
            assert 0 <= partner < ref.layout.sizes[block] and partner != pos
            images = ref.images(block)  # the partner is a member of the same block
            own = replay_base(ref.spec, params[pos], images[pos])
            other = replay_base(ref.spec, params[partner], images[partner])
            torch.testing.assert_close(batch.images[row], lam * own + (1 - lam) * other, rtol=0, atol=1e-6)
            labels = ref.plan["label"][ref.layout.block_slots(block)]
            want = torch.zeros(ref.num_classes)
            want[labels[pos]] += lam
            want[labels[partner]] += 1 - lam
            torch.testing.assert_close(batch.target[row], want, rtol=0, atol=1e-6)
            assert int(batch.labels[row]) == int(labels[pos])
    assert mixed >= len(batches) * BATCH - 1


def test_the_epoch_plan_lists_every_view_of_a_window_block_by_block():
    from kdcache.format import BlockLayout
    from kdcache.loader import _block_positions

    layout = BlockLayout(kind="permutation", block_capacity=7, blocks_per_unit=2, sizes=[7, 3, 5, 7])
    for blocks in ([0], [3, 1, 2], [2, 0, 1, 3]):
        expected = np.array([(b, p) for b in blocks for p in range(layout.sizes[b])], dtype=np.int64)
        got = _block_positions(layout, blocks)
        assert got.dtype == np.int64 and np.array_equal(got, expected)
