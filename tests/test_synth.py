"""LabelSynth: images synthesised from label maps (SynthSeg-style)."""
import numpy as np
import pytest
import scipy.ndimage as ndi

from dazoo.errors import DazooInputError
from dazoo.metrics import jacobian_determinant
from dazoo.training.synth import LabelSynth, integrate_svf

SHAPE = (24, 28, 20)


def _label_map(shape=SHAPE):
    """Nested boxes and a ball with non-contiguous ids (0, 3, 7, 42)."""
    labels = np.zeros(shape, np.int16)
    labels[3:-3, 3:-3, 3:-3] = 3
    labels[6:14, 6:20, 5:15] = 7
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    labels[np.sum((grid - np.array([16, 18, 10])[:, None, None, None]) ** 2, 0) < 16] = 42
    return labels


def test_per_label_intensities_are_the_gaussians_drawn():
    labels = _label_map()
    synth = LabelSynth(rotation=0, scale=0, shear=0, translation=0, nonlinear=0, blur=0,
                       thickness=1, bias=0, noise=0, gamma=0, std=(0.02, 0.1))
    sample = synth.draw(labels, 0)
    np.testing.assert_array_equal(sample.labels, labels)  # identity deformation
    raw = sample.image * sample.scale + sample.offset  # undo the min-max normalisation
    assert sample.gamma == 1.0 and sample.thickness == 1.0
    assert list(sample.ids) == [0, 3, 7, 42]
    for position, label in enumerate(sample.ids):
        values = raw[labels == label]
        tolerance = 4 * sample.stds[position] / np.sqrt(values.size) + 1e-5
        assert abs(values.mean() - sample.means[position]) < tolerance
        assert values.std() == pytest.approx(sample.stds[position], rel=0.15)
    assert sample.image.min() == 0.0 and sample.image.max() == pytest.approx(1.0)
    # Distinct draws per label, within the ranges asked.
    assert len(set(np.round(sample.means, 6))) == 4
    assert np.all((sample.stds >= 0.02) & (sample.stds <= 0.1))


def test_background_regions_have_their_own_gaussians():
    """background=k splits label 0 into 1..k smooth regions, each drawn from its own Gaussian;
    the labelled voxels and the label map are untouched."""
    labels = _label_map((32, 32, 32))
    plain = dict(rotation=0, scale=0, shear=0, translation=0, nonlinear=0, blur=0, thickness=1,
                 bias=0, noise=0, gamma=0, std=(0.02, 0.05))
    counts = set()
    for seed in range(6):
        sample = LabelSynth(background=5, background_spacing=6, **plain).draw(labels, seed)
        np.testing.assert_array_equal(sample.labels, labels)
        np.testing.assert_array_equal(sample.regions >= 0, labels == 0)
        raw = sample.image * sample.scale + sample.offset
        present = np.unique(sample.regions[sample.regions >= 0])
        counts.add(len(sample.region_means))
        assert len(present) <= len(sample.region_means) <= 5
        for region in present:
            values = raw[sample.regions == region]
            tolerance = 4 * sample.region_stds[region] / np.sqrt(values.size) + 1e-5
            assert abs(values.mean() - sample.region_means[region]) < tolerance
            if values.size > 50:
                assert values.std() == pytest.approx(sample.region_stds[region], rel=0.3)
        for position, label in enumerate(sample.ids[1:], start=1):  # labelled voxels as before
            values = raw[labels == label]
            assert abs(values.mean() - sample.means[position]) < 4 * sample.stds[position] \
                / np.sqrt(values.size) + 1e-5
        if len(present) > 1:  # regions are smooth blobs, not salt and pepper
            inner = sample.regions[1:-1, 1:-1, 1:-1]
            same = (inner == sample.regions[2:, 1:-1, 1:-1]) & (inner >= 0)
            assert same.sum() > 0.8 * (inner >= 0).sum()
    assert len(counts) > 1  # the number of regions is drawn
    # Without background (or with it drawn as zero) there are no regions.
    assert LabelSynth(**plain).draw(labels, 0).regions is None
    zero = LabelSynth(background=5, zero_background=1.0, **plain).draw(labels, 0)
    raw = zero.image * zero.scale + zero.offset  # before normalisation: the background is 0
    assert zero.regions is None and np.allclose(raw[labels == 0], 0.0, atol=1e-5)
    one, two = (LabelSynth(background=5, **plain).draw(labels, 9) for _ in range(2))
    np.testing.assert_array_equal(one.image, two.image)
    with pytest.raises(DazooInputError, match="background must be an integer"):
        LabelSynth(background=2.5)


def test_groups_share_one_gaussian():
    synth = LabelSynth(nonlinear=0, rotation=0, scale=0, shear=0, translation=0,
                       groups={7: 1, 42: 1})
    sample = synth.draw(_label_map(), 3)
    assert sample.means[2] == sample.means[3] and sample.stds[2] == sample.stds[3]
    assert sample.means[1] != sample.means[2]


def test_priors_give_a_known_contrast_with_their_probability():
    """priors: with prior_probability 1 every listed id draws its mean from its own range
    (a DESS-like contrast); with 0 the draws are the generic ones, the same as without
    priors (same seed, same sample)."""
    labels = _label_map()
    priors = {7: (0.9, 0.95), 42: (0.01, 0.02)}
    always = LabelSynth(nonlinear=0, mean=(0.3, 0.6), priors=priors, prior_probability=1.0)
    for seed in range(5):
        sample = always.draw(labels, seed)
        assert 0.9 <= sample.means[2] <= 0.95 and 0.01 <= sample.means[3] <= 0.02
        assert 0.3 <= sample.means[1] <= 0.6  # id 3 is not listed: generic
    never = LabelSynth(nonlinear=0, mean=(0.3, 0.6), priors=priors, prior_probability=0.0)
    plain = LabelSynth(nonlinear=0, mean=(0.3, 0.6))
    np.testing.assert_array_equal(never.draw(labels, 4).image, plain.draw(labels, 4).image)
    half = LabelSynth(nonlinear=0, rotation=0, scale=0, shear=0, translation=0, blur=0,
                      thickness=1, bias=0, noise=0, mean=(0.3, 0.6), priors=priors,
                      prior_probability=0.5)
    hits = sum(half.draw(labels, seed).means[2] >= 0.9 for seed in range(200))
    assert 70 < hits < 130  # binomial(200, 0.5): 5 standard deviations either side
    with pytest.raises(DazooInputError, match="priors"):
        LabelSynth(priors={7: (0.8, 0.2)})
    with pytest.raises(DazooInputError, match="prior_probability"):
        LabelSynth(prior_probability=1.5)


def test_labels_are_deformed_with_nearest_neighbour():
    labels = _label_map()
    sample = LabelSynth(nonlinear=3.0, rotation=10, scale=0.1).draw(labels, 1)
    assert set(np.unique(sample.labels)) <= {0, 3, 7, 42}  # no new ids, no interpolation
    assert sample.labels.dtype == labels.dtype
    expected = ndi.map_coordinates(labels, sample.coordinates, order=0, mode="constant")
    np.testing.assert_array_equal(sample.labels, expected)
    assert not np.array_equal(sample.labels, labels)
    # The image follows the labels: each label's voxels are brighter or darker as drawn.
    inside = sample.labels == 7
    assert inside.sum() > 100


def test_deformation_has_no_folding():
    synth = LabelSynth(nonlinear=4.0, nonlinear_spacing=6.0, rotation=15, scale=0.15,
                       shear=0.05)
    for seed in range(3):
        coords = synth.coordinates(SHAPE, np.random.default_rng(seed))
        identity = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"))
        displacement = np.moveaxis(coords - identity, 0, -1)
        # Interior voxels (central differences at the border see the clamped edge).
        det = jacobian_determinant(displacement)[1:-1, 1:-1, 1:-1]
        assert det.min() > 0, seed
        assert np.abs(displacement).max() > 1.0  # a real deformation


def test_svf_integration_is_a_flow():
    """exp(v) composed with exp(v) is exp(2v) (a one-parameter group), to interpolation error."""
    rng = np.random.default_rng(0)
    shape = (20, 20, 20)
    v = np.stack([ndi.gaussian_filter(rng.normal(0, 20.0, shape), 4) for _ in range(3)])
    v = v.astype(np.float32)
    assert np.abs(v).max() > 0.5
    one = integrate_svf(v, 7)
    two = integrate_svf(2 * v, 8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32)
    composed = one + np.stack([ndi.map_coordinates(c, grid + one, order=1, mode="nearest")
                               for c in one])
    inner = (slice(None),) + (slice(4, -4),) * 3
    np.testing.assert_allclose(composed[inner], two[inner], atol=0.02 * np.abs(two).max())
    # A constant velocity integrates to itself (a translation).
    constant = np.ones((3,) + shape, np.float32) * np.float32(0.7)
    np.testing.assert_allclose(integrate_svf(constant, 7), constant, atol=1e-5)


def test_same_seed_same_sample_and_different_seeds_differ():
    labels = _label_map()
    synth = LabelSynth()
    a, b, c = synth.draw(labels, 5), synth.draw(labels, 5), synth.draw(labels, 6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    image, moved = synth(labels, np.random.default_rng(5))
    np.testing.assert_array_equal(image, a.image)
    assert image.dtype == np.float32 and image.shape == labels.shape
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_thick_slices_lose_detail_along_their_axis_only():
    from dazoo.training.synth import _thick_slices

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"))
    image = (np.sin(grid[0] * 1.3) + np.sin(grid[2] * 1.3)).astype(np.float32)
    thick = _thick_slices(image, 0, 3.0)
    detail = lambda x, axis: np.abs(np.diff(x, axis=axis)).mean()  # noqa: E731
    assert detail(thick, 0) < 0.3 * detail(image, 0)
    assert detail(thick, 2) == pytest.approx(detail(image, 2), rel=0.35)
    # A smooth (linear) profile survives: slices and interpolation are exact on it.
    ramp = grid[0].astype(np.float32)
    np.testing.assert_allclose(_thick_slices(ramp, 0, 3.0)[6:-6], ramp[6:-6], atol=1e-4)


def _limb_map(shape=(12, 10, 30)):
    """A femur rod (1) leaving the map's top labelled plane 27, a tibia rod (3) its bottom
    one, 2; a patella (5) by the joint; planes 0-1 and 28-29 outside the map's view."""
    labels = np.zeros(shape, np.int16)
    labels[4:8, 3:7, 15:28] = 1
    labels[3:9, 3:8, 2:13] = 3
    labels[8:10, 6:9, 14:17] = 5
    return labels


def test_extend_repeats_the_labelled_end_planes_of_a_limb():
    labels = _limb_map()
    still = dict(rotation=0, scale=0, shear=0, translation=0, nonlinear=0)
    sample = LabelSynth(**still, extend_axis=2).draw(labels, 0)
    expected = np.take(labels, np.clip(np.arange(30), 2, 27), axis=2)
    np.testing.assert_array_equal(sample.labels, expected)
    assert np.all(sample.labels[4:8, 3:7, 28:] == 1) and np.all(sample.labels[3:9, 3:8, :2] == 3)
    # off: the planes outside the map's view stay background
    plain = LabelSynth(**still).draw(labels, 0)
    np.testing.assert_array_equal(plain.labels, labels)


def test_extend_shifts_the_anatomy_along_the_axis_and_fills_the_side_it_leaves():
    labels = _limb_map()
    synth = LabelSynth(rotation=0, scale=0, shear=0, translation=0, nonlinear=0,
                       extend_axis=2, extend=6.0)
    patella = []
    for seed in range(12):
        sample = synth.draw(labels, seed)
        shift = float(np.mean(sample.coordinates[2] - np.arange(30)[None, None, :],
                              where=(sample.coordinates[2] > 2) & (sample.coordinates[2] < 27)))
        assert abs(shift) <= 6.0
        index = np.clip(np.rint(np.arange(30) + shift), 2, 27).astype(int)
        np.testing.assert_array_equal(sample.labels, np.take(labels, index, axis=2))
        # both rods reach the grid's ends whatever the shift
        assert np.all(sample.labels[5, 4, 28:] == 1) and np.all(sample.labels[5, 4, :2] == 3)
        planes = np.flatnonzero((sample.labels == 5).any(axis=(0, 1)))
        patella.append(planes[0])
    assert min(patella) < 14 - 2 and max(patella) > 14 + 2  # it moves both ways
    assert all(14 - 6 <= p <= 14 + 6 for p in patella)


def test_end_planes_skip_a_partly_labelled_last_plane():
    from dazoo.training.synth import end_planes

    labels = _limb_map()
    assert end_planes(labels, 2) == (2, 27)
    labels[5, 4, 28] = 1          # a sliver of femur in the plane beyond: not the shaft
    labels[4:6, 3:5, 1] = 3       # a partial plane below the tibia: 4 of its 30 voxels
    assert end_planes(labels, 2) == (2, 27)
    assert end_planes(labels, 2, fraction=0.01) == (1, 28)
    assert end_planes(np.zeros((3, 3, 3), np.int16), 0) is None
    # LabelSynth repeats the full planes over the partial ones
    still = dict(rotation=0, scale=0, shear=0, translation=0, nonlinear=0)
    sample = LabelSynth(**still, extend_axis=2).draw(labels, 0)
    assert np.all(sample.labels[4:8, 3:7, 28:] == 1) and np.all(sample.labels[3:9, 3:8, :2] == 3)


def test_bad_options_are_one_line_errors():
    with pytest.raises(DazooInputError, match="rotation"):
        LabelSynth(rotation=-1)
    with pytest.raises(DazooInputError, match="mean"):
        LabelSynth(mean=(0.8, 0.2))
    with pytest.raises(DazooInputError, match="integer label map"):
        LabelSynth().draw(np.zeros(SHAPE, np.float32))
    with pytest.raises(DazooInputError, match="extend_axis"):
        LabelSynth(extend_axis=3)
    with pytest.raises(DazooInputError, match="needs extend_axis"):
        LabelSynth(extend=5.0)
    with pytest.raises(DazooInputError, match="needs falloff_axis"):
        LabelSynth(falloff=4.0)
    with pytest.raises(DazooInputError, match="falloff_axis"):
        LabelSynth(falloff=4.0, falloff_axis=-1)
    with pytest.raises(DazooInputError, match="falloff"):
        LabelSynth(falloff=-2.0, falloff_axis=2)


def test_falloff_off_leaves_samples_as_they_were():
    labels = _limb_map()
    plain = LabelSynth().draw(labels, 5)
    same = LabelSynth(falloff=0.0, falloff_axis=2).draw(labels, 5)
    np.testing.assert_array_equal(plain.image, same.image)
    assert same.falloff == (0.0, 0.0)


def test_falloff_multiplies_the_signal_by_a_raised_cosine_at_the_axis_ends():
    labels = _limb_map()
    # nothing drawn after the fall-off (no noise, no gamma): the same seed gives the same
    # image before it, so the ratio of the raw images is the fall-off's profile
    quiet = dict(noise=0.0, gamma=0.0, zero_background=0.0, mean=(0.2, 1.0))
    seen = set()
    for seed in range(16):
        off = LabelSynth(**quiet).draw(labels, seed)
        on = LabelSynth(**quiet, falloff=8.0, falloff_axis=2).draw(labels, seed)
        np.testing.assert_array_equal(on.labels, off.labels)  # the anatomy is unchanged
        ratio = (on.image * on.scale + on.offset) / (off.image * off.scale + off.offset)
        n = labels.shape[2]
        expected = np.ones(n)
        for end, (width, floor) in enumerate(zip(on.falloff, on.falloff_floor)):
            if width == 0:
                assert floor == 1.0
                continue
            assert 1.0 <= width <= 8.0 and 0.0 <= floor <= 0.5
            depth = np.arange(n) if end == 0 else np.arange(n)[::-1]
            t = np.minimum(depth / width, 1.0)
            expected *= floor + (1 - floor) * (1 - np.cos(np.pi * t)) / 2
            seen.add((end, True))
        for end in (0, 1):
            if on.falloff[end] == 0:
                seen.add((end, False))
        # constant across each plane of the axis, the profile along it
        np.testing.assert_allclose(ratio, np.broadcast_to(expected, ratio.shape), rtol=2e-5)
    assert seen == {(0, True), (0, False), (1, True), (1, False)}  # each end, either way


def test_pair_dataset_synthesises_label_only_subjects_and_replaces_with_probability():
    from dazoo.training import PairDataset

    labels = _label_map()
    rng = np.random.default_rng(0)
    images = [rng.random(SHAPE, dtype=np.float32), rng.random(SHAPE, dtype=np.float32), None]
    maps = [labels, None, np.roll(labels, 2, axis=0)]
    synth = LabelSynth(nonlinear=2.0)
    dataset = PairDataset(images, maps, names=["a", "b", "maps-only"], synth=synth,
                          steps_per_epoch=30, seed=1)
    assert dataset.labelled == [0, 2]  # the label-only subject counts as labelled
    classes = {int(c) for c in np.unique(dataset.classes[0])}
    seen = set()
    for index in range(30):
        batch = dataset[index]
        for side, subject in zip(("moving", "fixed"), dataset.pairs(index)[0]):
            seen.add(subject)
            image = batch[side][0, ..., 0]
            if subject == 0:  # synth_probability 0: the real image, untouched
                np.testing.assert_array_equal(image, images[0])
            if subject == 2:
                assert batch[f"{side}_labelled"][0] == 1
                assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05
                assert {int(c) for c in np.unique(batch[f"{side}_labels"])} <= classes
                # Labels and image agree: the synthesised intensity is constant-ish per class.
                moved = batch[f"{side}_labels"][0]
                assert not np.array_equal(moved, dataset.classes[2])
    assert seen == {0, 1, 2}
    again = PairDataset(images, maps, names=["a", "b", "maps-only"], synth=synth,
                        steps_per_epoch=30, seed=1)
    for key, value in dataset[3].items():
        np.testing.assert_array_equal(value, again[3][key])

    always = PairDataset(images[:2], maps[:2], synth=synth, synth_probability=1.0,
                         steps_per_epoch=4, seed=0)
    for index in range(4):
        batch = always[index]
        for side, subject in zip(("moving", "fixed"), always.pairs(index)[0]):
            replaced = not np.array_equal(batch[side][0, ..., 0], images[subject])
            assert replaced == (subject == 0)  # only the labelled image is synthesised

    with pytest.raises(DazooInputError, match="needs synth"):
        PairDataset(images, maps)
    with pytest.raises(DazooInputError, match="image or a label map"):
        PairDataset(images, [labels, None, None], synth=synth)


@pytest.mark.parametrize("phase_mode", [None, "joint"])
def test_map_fraction_sets_how_often_label_maps_are_drawn(phase_mode):
    """With 2 real images and 6 label maps, uniform draws pick a map 75 % of the time;
    map_fraction=0.2 picks one 20 % of the time (in registration and segmentation pairs)."""
    from dazoo.training import PairDataset
    from dazoo.batch import Schedule

    labels = _label_map()
    rng = np.random.default_rng(0)
    images = [rng.random(SHAPE, dtype=np.float32), rng.random(SHAPE, dtype=np.float32)] \
        + [None] * 6
    maps = [labels, None] + [np.roll(labels, k, axis=0) for k in range(6)]
    schedule = None if phase_mode is None else Schedule(phase_mode)

    def map_share(fraction):
        data = PairDataset(images, maps, synth=LabelSynth(), map_fraction=fraction,
                           steps_per_epoch=1500, seed=3, schedule=schedule)
        drawn = [s for i in range(1500) for s in data.pairs(i)[0]]
        return np.mean([s >= 2 for s in drawn])

    assert map_share(None) == pytest.approx(0.75, abs=0.04)
    assert map_share(0.2) == pytest.approx(0.2, abs=0.04)
    assert map_share(1.0) == 1.0
    with pytest.raises(DazooInputError, match="map_fraction"):
        PairDataset(images, maps, synth=LabelSynth(), map_fraction=1.5)


@pytest.mark.parametrize("kernel, order", [("bspline", 3), ("linear", 1)])
def test_separable_upsampling_equals_scipy_zoom(kernel, order):
    from dazoo.spatial import upsample

    coarse = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
    shape = (23, 30, 17)
    expected = ndi.zoom(coarse, [n / c for n, c in zip(shape, coarse.shape)], order=order,
                        mode="nearest", grid_mode=True, prefilter=False)[:23, :30, :17]
    np.testing.assert_allclose(upsample(coarse, shape, kernel=kernel), expected, atol=1e-5)


def test_a_tissue_seed_gives_two_anatomies_one_contrast():
    """pair_contrast: with one ``tissues`` seed, every id (group) gets the same Gaussian in
    two different maps, even when one map lacks an id; other seeds, other contrasts; the
    priors' coin and values follow the seed too."""
    synth = LabelSynth(nonlinear=1.0, groups={7: 1, 42: 1},
                       priors={3: (0.8, 0.9)}, prior_probability=0.5)
    a = _label_map()
    b = np.roll(a, 3, axis=1)
    b[b == 42] = 3                       # b has no id 42
    for seed in range(6):
        x = synth.draw(a, np.random.default_rng(seed), tissues=100 + seed)
        y = synth.draw(b, np.random.default_rng(50 + seed), tissues=100 + seed)
        for i in (0, 3, 7):
            kx, ky = int(np.searchsorted(x.ids, i)), int(np.searchsorted(y.ids, i))
            assert x.means[kx] == y.means[ky] and x.stds[kx] == y.stds[ky]
        assert x.means[list(x.ids).index(7)] == x.means[list(x.ids).index(42)]  # one group
        assert not np.array_equal(x.labels, y.labels)  # their own anatomy and pose
    other = synth.draw(b, np.random.default_rng(7), tissues=999)
    assert other.means[int(np.searchsorted(other.ids, 7))] != y.means[int(np.searchsorted(
        y.ids, 7))]
    priors = [synth.draw(a, np.random.default_rng(s), tissues=s).means[1] for s in range(40)]
    assert 5 < sum(0.8 <= m <= 0.9 for m in priors) < 35  # the coin still flips
    with pytest.raises(DazooInputError, match="pair_contrast"):
        LabelSynth(pair_contrast=1.5)


def _recording_synth(seen: list, **options) -> LabelSynth:
    """A LabelSynth that appends each draw's ``tissues`` seed to ``seen``."""
    class Recording(LabelSynth):
        def draw(self, labels, rng=None, *, tissues=None):
            seen.append(tissues)
            return super().draw(labels, rng, tissues=tissues)

    return Recording(**options)


def test_pair_dataset_shares_tissues_within_pairs_with_pair_contrast():
    from dazoo.training import PairDataset

    labels = _label_map()
    maps = [labels, np.roll(labels, 2, axis=0), np.roll(labels, -2, axis=1)]
    seen = []

    for probability, shared in ((1.0, True), (0.0, False)):
        seen.clear()
        synth = _recording_synth(seen, nonlinear=1.0, pair_contrast=probability)
        real = np.random.default_rng(0).random(labels.shape, dtype=np.float32)
        dataset = PairDataset([real, None, None, None], [None, *maps], synth=synth,
                              steps_per_epoch=20, seed=2, map_fraction=1.0)
        for index in range(20):
            dataset[index]
        moving, fixed = seen[0::2], seen[1::2]
        assert len(moving) == 20
        if shared:  # both images of every pair: one seed, a new one per pair
            assert moving == fixed and None not in moving and len(set(moving)) == 20
        else:
            assert set(seen) == {None}


def test_pair_dataset_flags_pairs_that_share_their_contrast():
    """``shared_contrast`` is 1 for two real scans and for two images synthesised with one
    ``tissues`` seed, 0 when one image was synthesised with its own intensities (checked
    against the synthesiser's own record of each pair's draws; every case occurs)."""
    from dazoo.training import PairDataset

    labels = _label_map()
    maps = [labels, np.roll(labels, 2, axis=0), np.roll(labels, -2, axis=1)]
    seen = []

    rng = np.random.default_rng(0)
    real = [rng.random(labels.shape, dtype=np.float32) for _ in range(2)]
    dataset = PairDataset([*real, None, None], [maps[0], None, maps[1], maps[2]],
                          synth=_recording_synth(seen, nonlinear=1.0, pair_contrast=0.5),
                          synth_probability=0.5, steps_per_epoch=60, seed=4)
    cases = set()
    for index in range(60):
        seen.clear()
        flag = dataset[index]["shared_contrast"]
        expected = {0: 1.0, 1: 0.0, 2: float(bool(seen) and seen[0] is not None)}[len(seen)]
        np.testing.assert_array_equal(flag, [expected])
        cases.add((len(seen), expected))
    assert cases == {(0, 1.0), (1, 0.0), (2, 1.0), (2, 0.0)}
