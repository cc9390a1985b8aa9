import numpy as np
import pytest

from armor_ref.masks import SUPPORTS, has_two_per_group, is_2of4, pack_2of4, select_2of4, unpack_2of4


def test_supports_are_the_six_ordered_pairs():
    assert SUPPORTS.shape == (6, 2)
    assert {tuple(s) for s in SUPPORTS} == {(i, j) for i in range(4) for j in range(4) if i < j}


def test_select_keeps_the_two_largest_per_group():
    scores = np.array([[1.0, 5.0, 3.0, 2.0, 0.0, -1.0, 7.0, 7.0]])
    mask = select_2of4(scores)
    assert mask.tolist() == [[False, True, True, False, False, False, True, True]]


def test_select_breaks_ties_toward_lower_columns():
    mask = select_2of4(np.ones((3, 8)))
    assert np.all(mask[:, [0, 1, 4, 5]]) and not np.any(mask[:, [2, 3, 6, 7]])


def test_select_rejects_widths_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        select_2of4(np.ones((2, 6)))


def test_is_2of4_detects_a_dense_group():
    W = np.zeros((2, 8))
    W[0, :2] = 1
    assert is_2of4(W)
    W[1, 4:7] = 1
    assert not is_2of4(W)


def test_pack_unpack_round_trip_and_index_codes():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((16, 32))
    mask = select_2of4(scores)
    core = rng.standard_normal((16, 32)) * mask
    core[0, np.nonzero(mask[0])[0][0]] = 0.0  # a kept value may be zero
    values, index = pack_2of4(core, mask)
    assert values.shape == (16, 16) and index.shape == (16, 8) and index.dtype == np.uint8
    p0, p1 = index & 3, index >> 2
    assert np.all(p0 < p1) and np.all(p1 <= 3)
    core2, mask2 = unpack_2of4(values, index)
    np.testing.assert_array_equal(core2, core)
    np.testing.assert_array_equal(mask2, mask)
    assert has_two_per_group(mask2)


def test_pack_stores_values_in_increasing_column_order():
    core = np.array([[0.0, 2.0, 0.0, 3.0]])
    mask = core != 0
    values, index = pack_2of4(core, mask)
    assert values.tolist() == [[2.0, 3.0]] and index.tolist() == [[1 | (3 << 2)]]


def test_unpack_rejects_bad_codes():
    with pytest.raises(ValueError, match="positions"):
        unpack_2of4(np.zeros((1, 2)), np.array([[1 | (1 << 2)]], dtype=np.uint8))


def test_pack_rejects_masks_without_two_per_group():
    with pytest.raises(ValueError, match="exactly 2"):
        pack_2of4(np.ones((1, 4)), np.array([[True, True, True, False]]))
