"""Files: safetensors reading and writing (fp32/fp16/bf16, bad files), calibration formats, the spec §6 file."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import make_small_model, write_raw_safetensors
from safetensors.numpy import load_file, save_file

import toolkit.armor_format as aio
import toolkit.calibration as calibration
import toolkit.files as files
from armor_ref.factorization import factorize
from armor_ref.masks import is_2of4
from armor_ref.objectives import gram_matrix
from toolkit.errors import ArmorError


@pytest.fixture(scope="module")
def layer():
    """A small factorized layer (64x128, block 16) with its calibration."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((64, 128))
    X = rng.standard_normal((300, 128)) * rng.uniform(0.1, 2.0, size=128)
    H = gram_matrix(X)
    return W, H, factorize(W, H, proxy="nowag", block_size=16, sweeps=2)


# ----------------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------------
def test_read_safetensors_decodes_bf16_fp16_fp32_and_passes_ints_through(tmp_path: Path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 4)).astype(np.float32)
    bf16_exact = (f32.view(np.uint32) & 0xFFFF0000).view(np.float32)  # values that bfloat16 holds exactly
    bf16_bits = (bf16_exact.view(np.uint32) >> 16).astype("<u2")
    f16 = f32.astype(np.float16)
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    flags = np.array([True, False, True])
    path = tmp_path / "mixed.safetensors"
    write_raw_safetensors(
        path,
        {
            "bf": ("BF16", [3, 4], bf16_bits.tobytes()),
            "half": ("F16", [3, 4], f16.astype("<f2").tobytes()),
            "single": ("F32", [3, 4], f32.astype("<f4").tobytes()),
            "ids": ("I64", [2, 3], ints.astype("<i8").tobytes()),
            "flags": ("BOOL", [3], flags.tobytes()),
        },
        metadata={"origin": "test"},
    )
    tensors, metadata = files.read_safetensors(path)
    assert metadata == {"origin": "test"}
    assert tensors["bf"].dtype == np.float32 and np.array_equal(tensors["bf"], bf16_exact)
    assert tensors["half"].dtype == np.float16 and np.array_equal(tensors["half"], f16)
    assert tensors["single"].dtype == np.float32 and np.array_equal(tensors["single"], f32)
    assert tensors["ids"].dtype == np.int64 and np.array_equal(tensors["ids"], ints)
    assert np.array_equal(tensors["flags"], flags)
    for name in ("half", "single", "ids"):  # the safetensors library agrees where it can read the dtype
        save_path = tmp_path / f"{name}.safetensors"
        save_file({name: tensors[name]}, str(save_path))
        assert np.array_equal(files.read_safetensors(save_path)[0][name], load_file(str(save_path))[name])


def test_bfloat16_decoding_of_known_bit_patterns():
    bits = np.array([0x3F80, 0xC000, 0x0000, 0x7F80, 0x3EAA], dtype=np.uint16)  # 1, -2, 0, inf, ~0.332
    out = files.bfloat16_to_float32(bits)
    assert out.dtype == np.float32
    assert out[:4].tolist() == [1.0, -2.0, 0.0, float("inf")]
    assert out[4] == pytest.approx(0.33203125)


def test_written_arrays_keep_their_logical_order_when_given_a_transposed_view(tmp_path: Path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = base.T  # not C-contiguous
    path = tmp_path / "t.safetensors"
    files.write_safetensors(path, {"t": view}, {"k": "v"})
    assert np.array_equal(files.read_safetensors(path)[0]["t"], view)
    assert np.array_equal(load_file(str(path))["t"], view)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the private mode of a temporary file


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a safetensors file"),
        (b"hello, this is plain text and not a tensor file", "not a safetensors file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not a safetensors file"),
        (b"\x15\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__": [1]}', "not a safetensors file"),
        (b"\x0b\x00\x00\x00\x00\x00\x00\x00" + b'{"t": "x"} ', "malformed header entry"),
    ],
)
def test_garbage_is_not_safetensors(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ArmorError, match=message):
        files.read_safetensors(path)


def test_truncated_files_are_reported_as_truncated(small_model):
    data = small_model.weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    for cut in (8 + header_len // 2, len(data) - 10):
        path = small_model.dir / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(ArmorError, match="truncated"):
            files.read_safetensors(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(ArmorError, match="file not found"):
        files.read_safetensors(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------------------
def test_npy_calibration_goes_to_every_tensor_of_matching_width(small_model, monkeypatch):
    monkeypatch.setattr(calibration, "GRAM_CHUNK_ROWS", 64)  # several chunks, including a partial one
    grams = calibration.load_calibration(small_model.calib, small_model.tensors)
    assert sorted(grams) == ["l1.weight", "l2.weight"]  # the 1-D tensors get nothing
    H, n = grams["l1.weight"]
    X = small_model.X.astype(np.float64)
    assert n == len(X) and H.dtype == np.float64
    np.testing.assert_allclose(H, X.T @ X, rtol=1e-12, atol=1e-9)


def test_npz_and_safetensors_calibration_by_name_with_activations_or_gram(small_model):
    X = small_model.X
    G = X.astype(np.float64).T @ X.astype(np.float64)
    npz = small_model.dir / "calib.npz"
    np.savez(npz, **{"l1.weight": X, "l2.weight.gram": G, "unrelated.weight": np.ones((2, 3))})
    grams = calibration.load_calibration(npz, small_model.tensors)
    assert sorted(grams) == ["l1.weight", "l2.weight"]
    np.testing.assert_allclose(grams["l1.weight"][0], G, rtol=1e-12, atol=1e-9)
    assert grams["l1.weight"][1] == len(X)
    np.testing.assert_array_equal(grams["l2.weight"][0], G)
    assert grams["l2.weight"][1] is None

    st = small_model.dir / "calib.safetensors"
    files.write_safetensors(st, {"l2.weight": X.astype(np.float16)}, {})
    grams = calibration.load_calibration(st, small_model.tensors)
    X16 = X.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(grams["l2.weight"][0], X16.T @ X16, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: np.save(d / "c.npy", np.ones((10, 100))), "has dimension 100"),
        (lambda d: np.save(d / "c.npy", np.full((10, 128), np.nan)), "NaN or Inf"),
        (lambda d: np.save(d / "c.npy", np.ones(128)), "not \\(N, d_in\\)"),
        (lambda d: (d / "c.npy").write_bytes(b"garbage, not numpy"), "cannot read calibration"),
        (lambda d: np.save(d / "c.npy", np.array([{"a": 1}], dtype=object)), "cannot read calibration"),
        (lambda d: np.savez(d / "c.npz", **{"l1.weight": np.ones((5, 64))}), "has dimension 64"),
        (lambda d: np.savez(d / "c.npz", **{"l1.weight.gram": np.ones((128, 127))}), "not a square"),
        (lambda d: np.savez(d / "c.npz", **{"l1.weight.gram": np.triu(np.ones((128, 128)))}), "not symmetric"),
        (lambda d: np.savez(d / "c.npz", other=np.ones((5, 128))), "no key naming any of the tensors l1.bias"),
        (lambda d: (d / "c.txt").write_text("1 2 3"), "unknown format"),
    ],
)
def test_bad_calibration_is_rejected(small_model, make, message):
    make(small_model.dir)
    path = next(p for p in small_model.dir.iterdir() if p.stem == "c")
    with pytest.raises(ArmorError, match=message):
        calibration.load_calibration(path, small_model.tensors)


# ----------------------------------------------------------------------------------------------------------
# the ARMOR file
# ----------------------------------------------------------------------------------------------------------
def test_armor_file_round_trip_matches_the_in_memory_result(tmp_path: Path, layer):
    W, H, result = layer
    bias = np.arange(64, dtype=np.float32)
    path = tmp_path / "m.armor.safetensors"
    aio.save_armor(path, {"l.weight": result}, {"l.bias": bias}, {"init": result.init, "sweeps": 2})

    raw = load_file(str(path))  # a standard safetensors file, readable by the library itself
    assert sorted(raw) == [
        "l.bias",
        "l.weight.armor.A",
        "l.weight.armor.B",
        "l.weight.armor.index",
        "l.weight.armor.values",
    ]
    assert raw["l.weight.armor.A"].dtype == np.float32 and raw["l.weight.armor.A"].shape == (4, 16, 16)
    assert raw["l.weight.armor.B"].dtype == np.float32 and raw["l.weight.armor.B"].shape == (8, 16, 16)
    assert raw["l.weight.armor.values"].shape == (64, 64)
    assert raw["l.weight.armor.index"].dtype == np.uint8 and raw["l.weight.armor.index"].shape == (64, 32)
    codes = raw["l.weight.armor.index"].astype(int)
    p0, p1 = codes & 3, codes >> 2
    assert np.all((0 <= p0) & (p0 < p1) & (p1 <= 3))

    armor = aio.load_armor(path)
    assert armor.names == ["l.weight"] and list(armor.passthrough) == ["l.bias"]
    assert armor.metadata["format"] == "armor" and armor.metadata["version"] == "1"
    assert armor.block_size == 16 and armor.proxy == "nowag" and armor.metadata["sweeps"] == "2"
    S, mask = armor.layers["l.weight"].core()
    assert is_2of4(S) and np.all(mask.reshape(64, -1, 4).sum(-1) == 2)
    W_hat = result.W_hat()
    scale = np.abs(W_hat).max()
    np.testing.assert_allclose(armor.reconstruct("l.weight"), W_hat, rtol=0, atol=1e-5 * scale)
    assert armor.reconstruct("l.weight", np.float32).dtype == np.float32
    np.testing.assert_array_equal(armor.passthrough["l.bias"], bias)


def test_numpy_forward_equals_W_hat_x_plus_bias(tmp_path: Path, layer):
    _, _, result = layer
    bias = np.linspace(-1, 1, 64).astype(np.float32)
    path = tmp_path / "m.armor.safetensors"
    aio.save_armor(path, {"enc.l.weight": result}, {"enc.l.bias": bias})
    armor = aio.load_armor(path)
    linear = armor.linear("enc.l.weight")
    assert linear.bias is not None
    x = np.random.default_rng(3).standard_normal((2, 5, 128))
    W_hat = armor.reconstruct("enc.l.weight")
    np.testing.assert_allclose(linear(x), x @ W_hat.T + bias, rtol=1e-10, atol=1e-10)
    assert armor.layers["enc.l.weight"].forward(x[0, 0]).shape == (64,)
    with pytest.raises(ValueError, match="expects 128"):
        linear(np.ones((3, 127)))


def test_save_armor_writes_contiguous_arrays_from_non_contiguous_results(tmp_path: Path, layer):
    _, _, result = layer
    odd = replace(result, A=np.asfortranarray(result.A), S=np.asfortranarray(result.S))
    path = tmp_path / "f.armor.safetensors"
    aio.save_armor(path, {"w": odd}, {"t": np.arange(6.0).reshape(2, 3).T})
    armor = aio.load_armor(path)
    np.testing.assert_allclose(armor.reconstruct("w"), result.W_hat(), atol=1e-5 * np.abs(result.W_hat()).max())
    np.testing.assert_array_equal(armor.passthrough["t"], np.arange(6.0).reshape(2, 3).T)


def _tamper(path: Path, out: Path, change) -> Path:
    tensors, metadata = files.read_safetensors(path)
    change(tensors, metadata)
    files.write_safetensors(out, tensors, metadata)
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, m: m.pop("format"), "not an ARMOR file"),
        (lambda t, m: m.update(block_size="eight"), "block_size"),
        (lambda t, m: t.pop("w.armor.index"), "w.armor.index is missing"),
        (lambda t, m: t.__setitem__("w.armor.index", np.full((64, 32), 0b0101, np.uint8)), "p0 < p1"),
        (lambda t, m: t.__setitem__("w.armor.values", np.zeros((64, 60), np.float32)), "do not fit"),
        (lambda t, m: t.__setitem__("w.armor.A", np.zeros((4, 8, 8), np.float32)), "blocks"),
        (lambda t, m: t.__setitem__("w.armor.index", t["w.armor.index"].astype(np.int64)), "uint8"),
    ],
)
def test_load_armor_validates(tmp_path: Path, layer, change, message):
    _, _, result = layer
    good = tmp_path / "good.safetensors"
    aio.save_armor(good, {"w": result}, {})
    bad = _tamper(good, tmp_path / "bad.safetensors", change)
    with pytest.raises(ArmorError, match=message):
        aio.load_armor(bad)


def test_metadata_fixed_keys_win_and_extras_are_kept(tmp_path: Path, layer):
    _, _, result = layer
    path = tmp_path / "m.safetensors"
    aio.save_armor(path, {"w": result}, {}, {"format": "other", "note": {"a": 1}})
    _, metadata = files.read_safetensors(path)
    assert metadata["format"] == "armor" and json.loads(metadata["note"]) == {"a": 1}
    assert json.loads(metadata["tensors"]) == ["w"] and metadata["values_dtype"] == "float32"


def test_failed_write_leaves_no_file(tmp_path: Path, layer):
    _, _, result = layer
    with pytest.raises(ValueError, match="clashes"):
        aio.save_armor(tmp_path / "x.safetensors", {"w": result}, {"w.armor.A": np.zeros(1)})
    with pytest.raises(ArmorError, match="does not exist"):
        files.write_safetensors(tmp_path / "missing_dir" / "x.safetensors", {"a": np.zeros(2)}, {})
    assert list(tmp_path.iterdir()) == []


def test_small_model_fixture_is_readable(tmp_path: Path):
    model = make_small_model(tmp_path)
    tensors, metadata = files.read_safetensors(model.weights)
    assert metadata == {"format": "np"}
    for name, array in model.tensors.items():
        np.testing.assert_array_equal(tensors[name], array)
