"""COCO segmentation ↔ RLE: known shapes, round trips, and every way an RLE can be wrong."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from instalign.data.masks import (counts_to_runs, resize_mask_nearest, resize_rle, rle_area, rle_decode,
                                  rle_decode_many, rle_encode, segmentation_to_rle)


def _runs_bruteforce(mask: np.ndarray) -> list[int]:
    """COCO's run lengths by definition: column-major, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def _random_masks(seed: int = 0):
    rng = np.random.default_rng(seed)
    yield np.zeros((7, 5), bool)
    yield np.ones((5, 7), bool)
    yield np.ones((1, 1), bool)
    for _ in range(40):
        h, w = rng.integers(1, 70, size=2)
        yield rng.random((h, w)) < rng.random()


# --------------------------------------------------------------- known shapes
def test_rectangle_polygon_rasterises_to_its_pixel_grid():
    # Integer corners (2, 3)–(10, 8): pycocotools fills exactly columns 2..9, rows 3..7.
    rle = segmentation_to_rle([[2, 3, 10, 3, 10, 8, 2, 8]], 12, 16)
    mask = rle_decode(rle["counts"], 12, 16)
    expected = np.zeros((12, 16), bool)
    expected[3:8, 2:10] = True
    assert rle["size"] == [12, 16] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(mask, expected)


def test_polygons_equal_pycocotools_rasterisation_and_merge_as_union():
    tri = [4.5, 2.0, 20.0, 18.5, 1.0, 18.0]
    square = [22.0, 2.0, 30.0, 2.0, 30.0, 10.0, 22.0, 10.0]
    h, w = 24, 32

    def ref(polys):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)

    for polys in ([tri], [square], [tri, square]):
        rle = segmentation_to_rle(polys, h, w)
        np.testing.assert_array_equal(rle_decode(rle["counts"], h, w), ref(polys))
    both = rle_decode(segmentation_to_rle([tri, square], h, w)["counts"], h, w)
    one = rle_decode(segmentation_to_rle([tri], h, w)["counts"], h, w)
    two = rle_decode(segmentation_to_rle([square], h, w)["counts"], h, w)
    np.testing.assert_array_equal(both, one | two)
    assert one.sum() > 100 and two.sum() == 64


def test_degenerate_polygons_are_dropped_like_rela():
    square = [0, 0, 4, 0, 4, 4, 0, 4]
    with_junk = segmentation_to_rle([square, [1, 1, 2, 2]], 8, 8)
    assert with_junk == segmentation_to_rle([square], 8, 8)
    with pytest.raises(ValueError, match="no polygon with at least 3 points"):
        segmentation_to_rle([[1, 1, 2, 2], []], 8, 8)


@pytest.mark.parametrize("seg, message", [
    ([], "empty polygon list"),
    ([[0, 0, 4, 0, 4]], "odd number of coordinates"),
    ([[0, 0, 4, 0, 4, float("nan")]], "non-finite"),
    ([[0, 0, "4", 0, 4, 4]], "not a flat list of numbers"),
    ([[0, 0, True, 0, 4, 4]], "not a flat list of numbers"),
    ([[0, 0, 4.0, 0, 4, None]], "not a flat list of numbers"),
    ([[0, 0, np.float32(4), 0, 4, float("inf")]], "non-finite"),
    ([[[0, 0], [4, 0], [4, 4]]], "not a flat list of numbers"),
    ("polygon", "must be a polygon list or an RLE dict"),
    ({"counts": "00"}, "must have 'counts' and 'size'"),
    ({"size": [8], "counts": "00"}, r"'size' must be \[height, width\]"),
    ({"size": [8, 9], "counts": [72]}, r"RLE size \[8, 9\] does not match the image size \[8, 8\]"),
    ({"size": [8, 8], "counts": [10, 20]}, "cover 30 pixels but the mask is 8x8 = 64"),
    ({"size": [8, 8], "counts": [70, -6]}, "negative run length"),
    ({"size": [8, 8], "counts": [60.0, 4]}, "must be ints"),
    ({"size": [8, 8], "counts": "0"}, "cover 0 pixels"),
    ({"size": [8, 8], "counts": "~~~"}, "outside the COCO alphabet"),
    ({"size": [8, 8], "counts": "P"}, "end in the middle of a value"),
    ({"size": [8, 8], "counts": 64}, "must be a list or a string"),
])
def test_invalid_segmentations_raise_with_a_reason(seg, message):
    with pytest.raises(ValueError, match=message):
        segmentation_to_rle(seg, 8, 8)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="two positive ints"):
        segmentation_to_rle([[0, 0, 1, 0, 1, 1]], 0, 8)
    with pytest.raises(ValueError, match="two positive ints"):
        rle_decode("0", 4.0, 4)


# -------------------------------------------------------------- round trips
def test_encode_decode_identity_and_runs_parse():
    for mask in _random_masks():
        counts = rle_encode(mask)
        assert isinstance(counts, str)
        np.testing.assert_array_equal(rle_decode(counts, *mask.shape), mask)
        assert counts_to_runs(counts).tolist() == _runs_bruteforce(mask)
        assert rle_area(counts, *mask.shape) == int(mask.sum())
        # pycocotools agrees on the encoding.
        assert counts == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def test_compressed_and_uncompressed_rle_normalise_to_the_same_string():
    for mask in _random_masks(seed=1):
        h, w = mask.shape
        counts = rle_encode(mask)
        assert segmentation_to_rle({"size": [h, w], "counts": counts}, h, w)["counts"] == counts
        assert segmentation_to_rle({"size": [h, w], "counts": counts.encode()}, h, w)["counts"] == counts
        assert segmentation_to_rle({"size": [h, w], "counts": _runs_bruteforce(mask)}, h, w)["counts"] == counts


def test_decode_many_stacks_in_order():
    masks = [m for m in _random_masks(seed=2) if m.shape == (5, 7)][:1] or [np.ones((5, 7), bool)]
    rng = np.random.default_rng(3)
    stack = np.stack(masks + [rng.random((5, 7)) < 0.5 for _ in range(3)])
    out = rle_decode_many([rle_encode(m) for m in stack], 5, 7)
    assert out.dtype == np.bool_ and out.flags.c_contiguous
    np.testing.assert_array_equal(out, stack)
    assert rle_decode_many([], 5, 7).shape == (0, 5, 7)
    with pytest.raises(ValueError, match="cover"):
        rle_decode_many([rle_encode(stack[0]), "0"], 5, 7)


def test_decode_validates_before_touching_the_c_decoder():
    # A too-short counts string would make pycocotools return uninitialised memory.
    counts = rle_encode(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match=r"cover 16 pixels but the mask is 3x5 = 15"):
        rle_decode(counts, 3, 5)


def test_resize_matches_pil_nearest():
    rng = np.random.default_rng(4)
    # Odd input sides: no output centre falls exactly on an input pixel edge, where PIL's
    # fixed-point arithmetic may round either way.
    for (h, w), (nh, nw) in [((31, 41), (64, 64)), ((63, 45), (17, 23)), ((9, 9), (9, 9))]:
        mask = rng.random((h, w)) < 0.4
        pil = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)) > 0
        np.testing.assert_array_equal(resize_mask_nearest(mask, nh, nw), pil)
        np.testing.assert_array_equal(rle_decode(resize_rle(rle_encode(mask), (h, w), (nh, nw)), nh, nw), pil)
    stack = rng.random((3, 10, 12)) < 0.5
    assert resize_mask_nearest(stack, 5, 6).shape == (3, 5, 6)
    # Exact 2x downscale at a tie: sample index floor((2i + 1) / 2 * 2) = 2i + 1.
    np.testing.assert_array_equal(resize_mask_nearest(stack, 5, 6), stack[:, 1::2, 1::2])


def test_out_size_scales_polygons_and_resizes_rles():
    # Polygons are rasterised at the new size directly: the rectangle doubles exactly.
    rle = segmentation_to_rle([[2, 3, 10, 3, 10, 8, 2, 8]], 12, 16, out_size=(24, 32))
    expected = np.zeros((24, 32), bool)
    expected[6:16, 4:20] = True
    assert rle["size"] == [24, 32]
    np.testing.assert_array_equal(rle_decode(rle["counts"], 24, 32), expected)
    # RLE input: decoded and resized nearest, from either encoding.
    mask = np.random.default_rng(5).random((21, 35)) < 0.3
    want = resize_mask_nearest(mask, 10, 14)
    for seg in ({"size": [21, 35], "counts": rle_encode(mask)}, {"size": [21, 35], "counts": _runs_bruteforce(mask)}):
        out = segmentation_to_rle(seg, 21, 35, out_size=(10, 14))
        assert out["size"] == [10, 14]
        np.testing.assert_array_equal(rle_decode(out["counts"], 10, 14), want)
    # Same size is a no-op; invalid input is still rejected before scaling.
    tri = [[0, 0, 4, 0, 4, 4]]
    assert segmentation_to_rle(tri, 8, 8, out_size=(8, 8)) == segmentation_to_rle(tri, 8, 8)
    with pytest.raises(ValueError, match="odd number"):
        segmentation_to_rle([[0, 0, 4, 0, 4]], 8, 8, out_size=(4, 4))


def test_numpy_scalar_coordinates_rasterise_like_python_numbers():
    """A pickled release can carry numpy scalars; they take the slow type check, same mask."""
    square = [1, 1, 6, 1.5, 6, 6, 1, 6]
    assert segmentation_to_rle([[np.float32(v) for v in square]], 8, 8) == segmentation_to_rle([square], 8, 8)
    assert segmentation_to_rle([[np.int64(v) if float(v).is_integer() else np.float64(v) for v in square]], 8, 8) \
        == segmentation_to_rle([square], 8, 8)
