"""Recorded augmentation views: drawn per (seed, sample, view), replayed bit for bit from the stored
parameters, and equal to plain-numpy implementations of each documented semantics."""

import json
import logging
import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from softlabels.augment import (AUGMENTATIONS, Crop, CutMix, Flip, MixUp, Pipeline, Shift, augmentation_from_settings,
                                parse_augment)
from softlabels.augment.signal import keyed_normals
from softlabels.errors import SoftlabelsError

N = 50  # samples in the dataset that partners are drawn from
SIGNAL, IMAGE = (2, 40), (3, 12, 16)
SPECS = {
    "shift?max=6": SIGNAL,
    "scale?max=0.25": SIGNAL,
    "noise?std=0.15": SIGNAL,
    "noise?std=0.15&generator=pcg64": SIGNAL,
    "crop?size=8,10&scale=0.35,1&ratio=0.75,1.3333": IMAGE,
    "flip": IMAGE,
    "mixup?alpha=1": SIGNAL,
    "cutmix?alpha=1": IMAGE,
}
SAMPLES, VIEWS = np.array([3, 7, 7, 0, 49]), np.array([0, 0, 1, 2, 0])


def inputs(shape, dtype=torch.float32):
    return torch.from_numpy(np.random.default_rng(0).standard_normal((N, *shape), dtype=np.float32)).to(dtype)


def stored(record):
    """The record as a store gives it back: fresh numpy arrays from the bytes."""
    return {k: np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape).copy() for k, v in record.items()}


def replay(pipeline, x, record):
    partners = pipeline.partners(record)
    return pipeline.apply(x[SAMPLES], record, None if partners is None else x[partners])


# -- plain-numpy references of the documented semantics ----------------------------------------------

def ref_shift(x, p, aug):
    idx = np.clip(np.arange(x.shape[-1])[None] - p["offset"][:, None].astype(np.int64), 0, x.shape[-1] - 1)
    return np.stack([xb[..., i] for xb, i in zip(x, idx)])


def ref_scale(x, p, aug):
    return x * p["factor"].reshape(-1, 1, 1)


def ref_keyed_normals(seed, size):
    """The documented generator of noise's keyed normals, in Python integers and ``math``."""
    values = []
    for k in range((size + 1) // 2):
        z = (seed + (k + 1) * 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        z ^= z >> 31
        r, angle = math.sqrt(-2 * math.log(((z >> 32) + 1) * 2**-32)), (z & 0xFFFFFFFF) * 2**-32 * 2 * math.pi
        values += [r * math.cos(angle), r * math.sin(angle)]
    return np.float32(values[:size])


def ref_noise(x, p, aug):
    shape = x.shape[1:]
    if aug.generator == "pcg64":
        noise = np.stack([np.random.default_rng(int(s)).standard_normal(shape, dtype=np.float32) for s in p["seed"]])
    else:
        noise = np.stack([ref_keyed_normals(int(s), math.prod(shape)).reshape(shape) for s in p["seed"]])
    return x + np.float32(aug.std) * noise


def ref_flip(x, p, aug):
    return np.where(p["flip"].reshape(-1, 1, 1, 1) == 1, x[..., ::-1], x)


def ref_mixup(x, p, aug, partner):
    lam = p["lam"].reshape(-1, *[1] * (x.ndim - 1))
    return lam * x + (np.float32(1) - lam) * partner


def ref_cutmix_mask(box, height, width):
    cy, cx = (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width
    y0, x0, y1, x1 = box.astype(np.float64)
    return ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]


def ref_cutmix(x, p, aug, partner):
    masks = np.stack([ref_cutmix_mask(box, *x.shape[-2:]) for box in p["box"]])
    return np.where(masks[:, None], partner, x)


REFERENCES = {"shift": ref_shift, "scale": ref_scale, "noise": ref_noise, "flip": ref_flip, "mixup": ref_mixup,
              "cutmix": ref_cutmix}


def ref_draw(aug, rng):
    """One view's parameters drawn by plain numpy as each docstring says (crop: see its own tests)."""
    if aug.name == "shift":
        return {"offset": rng.integers(-aug.max, aug.max, endpoint=True)}
    if aug.name == "scale":
        return {"factor": np.float32(1 + rng.uniform(-aug.max, aug.max))}
    if aug.name == "noise":
        return {"seed": rng.integers(2**64, dtype=np.uint64)}
    if aug.name == "flip":
        return {"flip": rng.random() < 0.5}
    partner, lam0 = rng.integers(N), rng.beta(aug.alpha, aug.alpha)
    if aug.name == "mixup":
        return {"partner": partner, "lam": np.float32(lam0)}
    cy, cx, half = rng.random(), rng.random(), math.sqrt(1 - lam0) / 2
    box = np.clip([cy - half, cx - half, cy + half, cx + half], 0, 1).astype(np.float32)
    return {"partner": partner, "box": box, "lam": np.float32(1 - ref_cutmix_mask(box, *IMAGE[1:]).mean())}


# -- every built-in ------------------------------------------------------------------------------------

def test_registry_names_every_builtin():
    assert sorted(AUGMENTATIONS) == sorted({spec.partition("?")[0] for spec in SPECS})


def test_keyed_noise_is_standard_normal_and_keyed_by_its_seed_alone():
    seeds = np.random.default_rng(3).integers(2**64, size=5000, dtype=np.uint64)
    z = keyed_normals(seeds, (41,)).astype(np.float64)
    assert z.shape == (5000, 41) and abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(np.abs(z) < 1) - 0.6827) < 0.005 and abs(np.mean(np.abs(z) < 2) - 0.9545) < 0.003
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 0.05  # the cosine and sine of one word
    assert np.array_equal(keyed_normals(seeds[[7, 7, 2]], (41,)), z[[7, 7, 2]].astype(np.float32))
    assert np.array_equal(keyed_normals(seeds[:3], (2, 3)), keyed_normals(seeds[:3], (6,)).reshape(3, 2, 3))


def test_a_manifest_without_a_noise_generator_replays_with_numpys_generator():
    """Caches dumped before keyed noise record no generator: they replay as they were made."""
    old = augmentation_from_settings({"name": "noise", "std": 0.15}, where="manifest")
    assert old.generator == "pcg64" and parse_augment("noise?std=0.15").generator == "keyed"
    assert augmentation_from_settings(parse_augment("noise?std=0.15").settings(), where="manifest").generator == "keyed"
    x, seeds = inputs(SIGNAL)[:3], np.array([1, 2**63 + 5, 9], np.uint64)
    expected = ref_noise(x.numpy(), {"seed": seeds}, old)
    assert np.array_equal(old.apply(x, {"seed": seeds}).numpy(), expected)
    assert not np.allclose(parse_augment("noise?std=0.15").apply(x, {"seed": seeds}).numpy(), expected)


@pytest.mark.parametrize("spec", SPECS)
def test_replay_from_a_stored_record_is_bit_identical(spec):
    shape, pipeline = SPECS[spec], Pipeline((parse_augment(spec),), seed=5)
    x = inputs(shape)
    record = pipeline.draw(SAMPLES, VIEWS, N, shape)
    assert {k: (v.dtype, v.shape[1:]) for k, v in record.items()} == pipeline.record_arrays(shape)
    views = replay(pipeline, x, record)
    assert views.shape == (len(SAMPLES), *pipeline.output_shape(shape)) and views.dtype == torch.float32
    assert torch.equal(views, replay(pipeline, x, stored(record)))
    assert torch.equal(views, replay(pipeline, x, {k: torch.from_numpy(v) for k, v in stored(record).items()}))
    assert torch.equal(views, replay(pipeline, x, pipeline.draw(SAMPLES, VIEWS, N, shape)))
    wide = replay(pipeline, x.double(), record)
    assert wide.dtype == torch.float64 and torch.allclose(wide.float(), views, atol=1e-5)


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith("crop")])
def test_draws_and_applies_match_plain_numpy(spec):
    shape, aug = SPECS[spec], parse_augment(spec)
    pipeline = Pipeline((aug,), seed=11)
    record = pipeline.draw(SAMPLES, VIEWS, N, shape)
    for b, (sample, view) in enumerate(zip(SAMPLES, VIEWS)):
        expected = ref_draw(aug, np.random.default_rng([11, sample, view]))
        assert expected.keys() == aug.params(shape).keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(record[f"{aug.name}.{name}"][b], value)
    x = inputs(shape)
    params = {k.partition(".")[2]: v for k, v in record.items()}
    if aug.mixes:
        partner = x[pipeline.partners(record)].numpy()
        expected = REFERENCES[aug.name](x[SAMPLES].numpy(), params, aug, partner)
    else:
        expected = REFERENCES[aug.name](x[SAMPLES].numpy(), params, aug)
    assert np.array_equal(replay(pipeline, x, record).numpy(), expected)


def test_crop_of_the_whole_image_is_the_image():
    x = inputs((3, 28, 28))[:4]
    assert torch.equal(Crop(size=(28, 28)).apply(x, {"box": np.tile(np.float32([0, 0, 1, 1]), (4, 1))}), x)


def test_crop_is_grid_sample_of_the_boxs_affine_grid():
    x = inputs(IMAGE)[:4]
    box = np.float32([[0.1, 0.2, 0.5, 0.7], [0, 0, 1, 1], [0.3, 0.3, 0.2, 0.2], [0.5, 0, 0.5, 1]])
    top, left, h, w = torch.from_numpy(box).unbind(-1)
    zero = torch.zeros_like(h)
    theta = torch.stack([torch.stack([w, zero, 2 * left + w - 1], -1), torch.stack([zero, h, 2 * top + h - 1], -1)], -2)
    grid = torch.nn.functional.affine_grid(theta, [4, 3, 9, 20], align_corners=False)
    expected = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(Crop(size=(9, 20)).apply(x, {"box": box}), expected, atol=1e-5, rtol=0)


def test_crop_of_a_ramp_is_bilinear_at_the_documented_points():
    height, width, (out_h, out_w) = 16, 16, (6, 7)
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ramp = np.stack([i / height + 0.5 * j / width + 0.1 * c for c in range(3)]).astype(np.float32)
    top, left, h, w = 0.25, 0.125, 0.5, 0.625
    out = Crop(size=(out_h, out_w)).apply(torch.from_numpy(ramp)[None], {"box": np.float32([[top, left, h, w]])})
    y = height * (top + h * (np.arange(out_h) + 0.5) / out_h) - 0.5  # all inside the image: no edge repeats
    x = width * (left + w * (np.arange(out_w) + 0.5) / out_w) - 0.5
    expected = np.stack([y[:, None] / height + 0.5 * x[None, :] / width + 0.1 * c for c in range(3)])
    assert out.shape == (1, 3, out_h, out_w)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5, rtol=0)


# -- keys, seeds, partners -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS)
def test_draws_are_keyed_by_sample_and_view_not_by_batch(spec):
    shape, pipeline = SPECS[spec], Pipeline((parse_augment(spec),), seed=3)
    together = pipeline.draw(np.array([3, 7]), np.array([0, 1]), N, shape)
    alone = [pipeline.draw(np.array([s]), np.array([v]), N, shape) for s, v in ((3, 0), (7, 1))]
    for name, array in together.items():
        np.testing.assert_array_equal(array, np.concatenate([a[name] for a in alone]))
    other = Pipeline((parse_augment(spec),), seed=4).draw(np.arange(20), np.zeros(20, int), N, shape)
    same = pipeline.draw(np.arange(20), np.zeros(20, int), N, shape)
    assert any(not np.array_equal(other[k], same[k]) for k in same)


def test_partners_are_dataset_indices_whatever_the_batch():
    pipeline = Pipeline((Shift(max=2), MixUp()), seed=0)
    samples, views = np.repeat(np.arange(N), 4), np.tile(np.arange(4), N)
    partners = pipeline.partners(pipeline.draw(samples, views, N, SIGNAL))
    assert partners.dtype == np.int64 and partners.min() >= 0 and partners.max() < N
    assert len(np.unique(partners)) > 0.8 * N  # drawn from the whole dataset
    subset = np.array([199, 5, 120])
    np.testing.assert_array_equal(pipeline.partners(pipeline.draw(samples[subset], views[subset], N, SIGNAL)), partners[subset])


# -- distributions -------------------------------------------------------------------------------------

def draw_many(spec, shape, keys=2000):
    aug = parse_augment(spec)
    record = Pipeline((aug,), seed=0).draw(np.arange(keys), np.zeros(keys, int), N, shape)
    return {k.partition(".")[2]: v for k, v in record.items()}


def test_shift_offsets_cover_the_range():
    offsets = draw_many("shift?max=6", SIGNAL)["offset"]
    assert set(offsets.tolist()) == set(range(-6, 7))


def test_scale_factors_stay_in_range():
    factors = draw_many("scale?max=0.25", SIGNAL)["factor"]
    assert factors.min() >= 0.75 and factors.max() <= 1.25 and abs(factors.mean() - 1) < 0.01
    assert factors.min() < 0.76 and factors.max() > 1.24


def test_flip_rate_is_one_half():
    assert abs(draw_many("flip", IMAGE)["flip"].mean() - 0.5) < 0.04


def test_crop_boxes_fit_the_image_with_area_and_aspect_in_range():
    box = draw_many("crop?size=8,8&scale=0.35,1&ratio=0.75,1.3333", (3, 32, 32))["box"].astype(np.float64)
    top, left, h, w = box.T
    assert top.min() >= 0 and left.min() >= 0 and (top + h).max() <= 1 and (left + w).max() <= 1
    assert np.allclose(box * 32, np.round(box * 32), atol=1e-4)  # whole pixels, as torchvision draws them
    area, aspect = h * w, w / h
    # Rounding to whole pixels moves a 19-pixel side by up to half a pixel.
    assert area.min() > 0.35 * 0.94 and area.min() < 0.4 and area.max() > 0.95
    assert aspect.min() > 0.75 * 0.95 and aspect.max() < 1.3333 * 1.05


def test_cutmix_lam_is_the_exact_fraction_of_own_pixels():
    drawn = draw_many("cutmix?alpha=1", IMAGE)
    own = np.stack([1 - ref_cutmix_mask(box, *IMAGE[1:]).mean() for box in drawn["box"]])
    np.testing.assert_array_equal(drawn["lam"], own.astype(np.float32))
    assert drawn["lam"].min() == 0 or drawn["lam"].min() < 0.1
    assert drawn["lam"].max() == 1 and 0.5 < drawn["lam"].mean() < 0.8  # clipped boxes paste less


def test_cutmix_pastes_pixels_whose_centre_is_in_the_half_open_box():
    x, partner = torch.zeros(1, 2, 8, 8), torch.ones(1, 2, 8, 8)
    box = np.float32([[0.5 / 8, 1.5 / 8, 4.5 / 8, 7.5 / 8]])  # every edge on a pixel centre
    mixed = CutMix().apply(x, {"box": box}, partner)
    expected = torch.zeros(8, 8)
    expected[0:4, 1:7] = 1
    assert torch.equal(mixed, expected.expand(1, 2, 8, 8))


def test_mixup_lam_follows_beta():
    assert abs(draw_many("mixup?alpha=1", SIGNAL)["lam"].mean() - 0.5) < 0.03
    lam = draw_many("mixup?alpha=0.2", SIGNAL)["lam"]
    assert ((lam < 0.1) | (lam > 0.9)).mean() > 0.6


# a value of each parameter that its augmentation never draws (a noise seed may be any 64-bit integer)
UNDRAWABLE = {
    "shift?max=6": {"offset": 7},
    "scale?max=0.25": {"factor": 1.2501},
    "crop?size=8,10&scale=0.35,1&ratio=0.75,1.3333": {"box": [0.5, 0, 0.6, 1]},
    "flip": {"flip": 2},
    "mixup?alpha=1": {"partner": N, "lam": 7},
    "cutmix?alpha=1": {"partner": -1, "box": [0.6, 0, 0.5, 1], "lam": 0.5},
}


@pytest.mark.parametrize("spec", list(SPECS))
def test_stored_parameters_are_checked_against_what_their_augmentation_draws(spec):
    aug, shape = parse_augment(spec), SPECS[spec]
    pipeline = Pipeline((aug,), seed=0)
    record = pipeline.draw(np.arange(500), np.zeros(500, int), N, shape)
    assert list(pipeline.undrawn(record, shape, N)) == []
    assert aug.drawable({k.partition(".")[2]: v for k, v in record.items()}, shape, N).keys() == aug.params(shape).keys()
    for param, value in UNDRAWABLE.get(spec, {}).items():
        edited = {k: v.copy() for k, v in record.items()}
        edited[f"{aug.name}.{param}"][3] = value
        name, bad, _ = next(pipeline.undrawn(edited, shape, N))
        assert (name, np.flatnonzero(bad).tolist()) == (f"{aug.name}.{param}", [3])
        edited[f"{aug.name}.{param}"][3] = np.nan if edited[f"{aug.name}.{param}"].dtype.kind == "f" else value
        name, bad, _ = next(pipeline.undrawn(edited, shape, N))
        assert (name, np.flatnonzero(bad).tolist()) == (f"{aug.name}.{param}", [3])


# -- pipelines -----------------------------------------------------------------------------------------

def test_a_mixing_pipeline_records_and_replays_the_partners_views():
    pipeline = Pipeline((parse_augment("shift?max=6"), parse_augment("scale?max=0.25"), MixUp()), seed=9)
    assert pipeline.record_arrays(SIGNAL) == {
        "shift.offset": (np.dtype(np.int32), ()), "scale.factor": (np.dtype(np.float32), ()),
        "mixup.partner": (np.dtype(np.int64), ()), "mixup.lam": (np.dtype(np.float32), ()),
        "partner.shift.offset": (np.dtype(np.int32), ()), "partner.scale.factor": (np.dtype(np.float32), ()),
    }
    record = pipeline.draw(SAMPLES, VIEWS, N, SIGNAL)
    for b, (sample, view) in enumerate(zip(SAMPLES, VIEWS)):  # the documented draw order
        rng = np.random.default_rng([9, sample, view])
        drawn = [rng.integers(-6, 6, endpoint=True), np.float32(1 + rng.uniform(-0.25, 0.25)), rng.integers(N),
                 np.float32(rng.beta(1.0, 1.0)), rng.integers(-6, 6, endpoint=True), np.float32(1 + rng.uniform(-0.25, 0.25))]
        assert [record[name][b] for name in pipeline.record_arrays(SIGNAL)] == drawn
    x = inputs(SIGNAL)
    mine = {"offset": record["shift.offset"], "factor": record["scale.factor"]}
    theirs = {"offset": record["partner.shift.offset"], "factor": record["partner.scale.factor"]}
    partner = x[pipeline.partners(record)].numpy()
    expected = ref_mixup(ref_scale(ref_shift(x[SAMPLES].numpy(), mine, None), mine, None),
                         {"lam": record["mixup.lam"]}, None, ref_scale(ref_shift(partner, theirs, None), theirs, None))
    assert np.array_equal(replay(pipeline, x, record).numpy(), expected)
    assert torch.equal(pipeline.lam(record), torch.from_numpy(record["mixup.lam"]))
    with pytest.raises(SoftlabelsError, match="mixup mixes each view with a partner: pass the partners' raw inputs"):
        pipeline.apply(x[SAMPLES], record)
    with pytest.raises(SoftlabelsError, match="no augmentation mixes views"):
        Pipeline((Shift(max=1),)).apply(x[:1], {"shift.offset": np.int32([0])}, x[:1])


def test_a_crop_reshapes_what_the_next_augmentations_see():
    pipeline = Pipeline((parse_augment("crop?size=8,10"), Flip(), CutMix()), seed=2)
    pipeline.check_input(IMAGE, where="data")
    assert pipeline.output_shape(IMAGE) == (3, 8, 10)
    assert list(pipeline.record_arrays(IMAGE)) == ["crop.box", "flip.flip", "cutmix.partner", "cutmix.box", "cutmix.lam",
                                                    "partner.crop.box", "partner.flip.flip"]
    record = pipeline.draw(SAMPLES, VIEWS, N, IMAGE)
    pasted = np.stack([ref_cutmix_mask(box, 8, 10).mean() for box in record["cutmix.box"]])
    np.testing.assert_array_equal(record["cutmix.lam"], (1 - pasted).astype(np.float32))  # on the crop's 8 x 10 pixels
    assert replay(pipeline, inputs(IMAGE), record).shape == (len(SAMPLES), 3, 8, 10)


def error_of(call):
    with pytest.raises(SoftlabelsError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("augs, expected", [
    ((MixUp(), Shift(max=2)), "mixer mixup must come last (it mixes the augmented views), got mixup, shift"),
    ((Shift(max=2), MixUp(), CutMix()), "at most one mixer per pipeline, got mixup and cutmix"),
    ((Shift(max=2), Flip(), Shift(max=3)), "augmentation shift is listed twice"),
])
def test_pipelines_refuse_bad_orders(augs, expected):
    assert expected in error_of(lambda: Pipeline(augs))


@pytest.mark.parametrize("shape", [(40,), (28, 28), (3, 8, 8)])
def test_flip_mirrors_the_last_axis_of_inputs_of_any_shape(shape):
    pipeline = Pipeline((Flip(),))
    pipeline.check_input(shape, where="data")  # a signal, a grey image, an image: view caches of each exist
    x = torch.arange(2 * math.prod(shape), dtype=torch.float32).reshape(2, *shape)
    out = Flip().apply(x, {"flip": np.array([1, 0], np.uint8)})
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_pipelines_refuse_bad_seeds_and_inputs():
    assert "seed must be an integer in [0, 2**63), got -1" in error_of(lambda: Pipeline((), seed=-1))
    crop = Pipeline((parse_augment("crop?size=8,8"),))
    assert error_of(lambda: crop.check_input((40,), where="--data x.npz")) == \
        "--data x.npz: crop works on images [C, H, W], not inputs of shape [40]"
    assert "shift works on signals [L] or [C, L], not inputs of shape [3, 8, 8]" in \
        error_of(lambda: Pipeline((Shift(max=1),)).check_input((3, 8, 8), where="data"))
    assert "cutmix works on images" in error_of(lambda: Pipeline((CutMix(),)).check_input(SIGNAL, where="data"))


@pytest.mark.parametrize("spec, expected", [
    ("rotate", "--augment 'rotate': unknown augmentation 'rotate' (known: shift, scale, noise, crop, flip, mixup, cutmix"),
    ("shift?max=3&foo=1", "--augment 'shift?max=3&foo=1': shift has no parameter 'foo' (its parameters: max)"),
    ("flip?p=0.3", "flip has no parameter 'p' (it has no parameters)"),
    ("shift", "--augment 'shift': shift needs max (its parameters: max)"),
    ("shift?max=-1", "--augment 'shift?max=-1': shift max must be an integer from 0 to 2**31 - 1, got -1"),
    ("shift?max=3000000000", "shift max must be an integer from 0 to 2**31 - 1, got 3000000000"),
    ("shift?max=1.5", "shift max must be an integer, got 1.5"),
    ("scale?max=abc", "scale max must be a number, got 'abc'"),
    ("scale?max=1", "scale max must be a number in [0, 1), got 1"),
    ("noise?std=-0.1", "noise std must be a number >= 0, got -0.1"),
    ("crop?size=0,4", "--augment 'crop?size=0,4': crop size must be 2 positive integers (height,width), got [0, 4]"),
    ("crop?size=24", "crop size must be 2 integers, comma-separated, got 24"),
    ("crop?size=8,8&scale=2,1", "crop scale must be 2 area fractions a,b with 0 < a <= b <= 1, got 2,1"),
    ("crop?size=8,8&ratio=1,0.5", "crop ratio must be 2 aspect ratios c,d with 0 < c <= d, got 1,0.5"),
    ("mixup?alpha=0", "mixup alpha must be a number > 0, got 0"),
    ("shift?max=1&max=2", "max is given twice"),
])
def test_bad_specs_are_refused_in_one_helpful_line(spec, expected):
    assert expected in error_of(lambda: parse_augment(spec))


def test_specs_parse_to_numbers_of_each_fields_type():
    assert parse_augment("shift?max=6") == Shift(max=6)
    assert parse_augment("crop?size=24,24&scale=0.35,1&ratio=0.75,1.3333") == \
        Crop(size=(24, 24), scale=(0.35, 1.0), ratio=(0.75, 1.3333))
    assert parse_augment("mixup").settings() == {"name": "mixup", "alpha": 1.0}
    assert parse_augment("crop?size=8,8").settings() == {"name": "crop", "size": [8, 8], "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]}


@pytest.mark.parametrize("specs", [["shift?max=6", "scale?max=0.25", "noise?std=0.15", "mixup?alpha=0.4"],
                                   ["crop?size=24,24&scale=0.35,1", "flip", "cutmix"]])
def test_settings_round_trip_through_json(specs):
    pipeline = Pipeline(tuple(parse_augment(s) for s in specs), seed=2**62)
    settings = json.loads(json.dumps(pipeline.settings()))
    assert Pipeline.from_settings(settings, where="m") == pipeline and settings == pipeline.settings()


def test_manifest_settings_are_checked():
    assert error_of(lambda: Pipeline.from_settings({"seed": 0, "augment": [], "order": 1}, where="c.zarr")).startswith(
        "c.zarr: augmentation settings are {seed: int, augment: [entries]}")
    assert "c.zarr augment[1]: unknown augmentation 'rotate'" in error_of(
        lambda: Pipeline.from_settings({"seed": 0, "augment": [{"name": "flip"}, {"name": "rotate"}]}, where="c.zarr"))
    assert "c.zarr augment[0]: shift max must be an integer from 0 to 2**31 - 1, got -2" in error_of(
        lambda: Pipeline.from_settings({"augment": [{"name": "shift", "max": -2}]}, where="c.zarr"))
    assert "c.zarr: mixer mixup must come last" in error_of(
        lambda: Pipeline.from_settings({"augment": [{"name": "mixup"}, {"name": "flip"}]}, where="c.zarr"))


# -- custom augmentations ------------------------------------------------------------------------------

CUSTOM_MODULE = textwrap.dedent("""
    from dataclasses import dataclass
    from typing import ClassVar

    import numpy as np
    import torch

    from softlabels.augment import Augmentation

    __version__ = "1.2"


    @dataclass(frozen=True)
    class Invert(Augmentation):
        gain: float = 1.0

        name: ClassVar[str] = "invert"

        def params(self, shape):
            return {"sign": (np.dtype(np.int32), ())}

        def draw(self, rng, shape, num_samples):
            return {"sign": np.int32(rng.choice([-1, 1]))}

        def apply(self, x, params):
            sign = torch.as_tensor(params["sign"], device=x.device).reshape(-1, *[1] * (x.dim() - 1))
            return x * (self.gain * sign).to(x.dtype)


    def invert(gain=1.0):
        return Invert(gain=gain)


    def number():
        return 3
""")


@pytest.fixture
def custom(tmp_path, monkeypatch):
    (tmp_path / "custom_aug.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "custom_aug:invert?gain=2"
    sys.modules.pop("custom_aug", None)


def test_a_custom_augmentation_records_its_callable_and_version(custom):
    aug = parse_augment(custom)
    assert type(aug).__name__ == "Invert" and aug.gain == 2
    assert aug.settings() == {"name": "invert", "callable": "custom_aug:invert", "version": "1.2", "gain": 2}
    pipeline = Pipeline((aug, MixUp()), seed=1)
    record = pipeline.draw(SAMPLES, VIEWS, N, SIGNAL)
    assert set(np.unique(record["invert.sign"])) == {-1, 1} and "partner.invert.sign" in record
    x = inputs(SIGNAL)
    assert torch.equal(replay(pipeline, x, record), replay(pipeline, x, stored(record)))


def test_a_recorded_callable_runs_only_when_trusted(custom, caplog):
    pipeline = Pipeline((parse_augment(custom), Flip()), seed=1)
    settings = json.loads(json.dumps(pipeline.settings()))
    sys.modules.pop("custom_aug")
    message = error_of(lambda: Pipeline.from_settings(settings, where="c.zarr", trust_code=False))
    assert message.startswith("c.zarr augment[0] (field 'callable') names code 'custom_aug:invert?gain=2'")
    assert "pass --augment 'custom_aug:invert?gain=2' to allow it" in message and "--trust-code" in message
    assert "custom_aug" not in sys.modules  # refused before anything was imported
    trusted = Pipeline.from_settings(settings, where="c.zarr", trust_code=True)
    assert trusted.settings() == pipeline.settings()
    x = inputs(IMAGE)
    record = pipeline.draw(SAMPLES, VIEWS, N, IMAGE)
    assert torch.equal(replay(trusted, x, record), replay(pipeline, x, record))
    settings["augment"][0]["version"] = "1.0"
    with caplog.at_level(logging.WARNING):
        augmentation_from_settings(settings["augment"][0], where="c.zarr", trust_code=True)
    assert "custom_aug:invert is now version 1.2, but version 1.0 was recorded" in caplog.text


def test_a_custom_callable_must_build_an_augmentation(custom):
    assert "custom_aug:number returned 3, not an Augmentation" in error_of(lambda: parse_augment("custom_aug:number"))
    assert "augmentation custom_aug:invert failed to build: TypeError" in error_of(lambda: parse_augment("custom_aug:invert?scale=2"))
    assert "name cannot be a setting" in error_of(lambda: parse_augment("custom_aug:invert?name=y"))


# -- devices -------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_replays_what_the_cpu_does(spec):
    shape, pipeline = SPECS[spec], Pipeline((parse_augment(spec),), seed=5)
    x = inputs(shape)
    record = pipeline.draw(SAMPLES, VIEWS, N, shape)
    partners = pipeline.partners(record)
    on_cuda = pipeline.apply(x[SAMPLES].cuda(), record, None if partners is None else x[partners].cuda())
    assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), replay(pipeline, x, record))
