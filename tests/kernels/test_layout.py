"""Packing: round trips, the checkpoint encoding, byte counts and the module-attribute contract."""
import pytest
import torch

from duoserve.format.bitmask import encode_bitmask
from duoserve.kernels import BLOCK_ROWS, PackedWeight, pack_bitmask, pack_dense, unpack_dense


def _sparse(n, k, p_w, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < p_w] = 0
    return w.to(dtype)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (33, 77), (971, 300), (128, 256), (129, 33)])
@pytest.mark.parametrize("p_w", [0.0, 0.5, 0.9, 1.0])
def test_pack_dense_round_trip(n, k, p_w):
    w = _sparse(n, k, p_w)
    packed = pack_dense(w)
    assert packed.nnz == int((w != 0).sum())
    assert torch.equal(unpack_dense(packed), w)
    assert packed.values[packed.nnz:].eq(0).all() and packed.values.numel() == packed.nnz + BLOCK_ROWS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pack_bitmask_matches_pack_dense(dtype):
    w = _sparse(300, 77, 0.5, dtype)
    bitmask, values = encode_bitmask(w)  # the checkpoint's on-disk encoding
    a, b = pack_bitmask(bitmask, values, tuple(w.shape)), pack_dense(w)
    for name in ("bitmap", "offsets", "values"):
        assert torch.equal(a.tensors()[name], b.tensors()[name]), name


def test_pack_bitmask_rejects_inconsistent_input():
    bitmask, values = encode_bitmask(_sparse(16, 20, 0.5))
    with pytest.raises(ValueError, match="set bits"):
        pack_bitmask(bitmask, values[:-1], (16, 20))
    with pytest.raises(ValueError, match="bitmask must be"):
        pack_bitmask(bitmask[:, :2], values, (16, 20))


def test_unpack_row_range():
    w = _sparse(400, 50, 0.5)
    assert torch.equal(unpack_dense(pack_dense(w), 128, 300), w[128:300])


def test_bytes_per_element_near_bitmap_bound():
    w = _sparse(4096, 1024, 0.5)
    packed = pack_dense(w)
    # 2 bytes x 0.5 + bitmap 1/8 + int32 offset per 128 rows = 1.156; bitmap bound 1.125
    assert packed.bytes_per_element() < 1.17
    assert packed.nbytes() < 0.6 * w.numel() * w.element_size()


def test_tensors_round_trip_and_validation():
    packed = pack_dense(_sparse(200, 40, 0.5))
    rebuilt = PackedWeight.from_tensors(packed.tensors(), packed.n, packed.k)
    assert rebuilt.nnz == packed.nnz and rebuilt.nbytes() == packed.nbytes()
    with pytest.raises(ValueError, match="bitmap"):
        PackedWeight.from_tensors(packed.tensors(), packed.n + 128, packed.k)
    moved = packed.to(dtype=torch.float32)
    assert moved.dtype == torch.float32 and moved.bitmap.dtype == torch.int32


@pytest.mark.parametrize("n,k", [(200, 40), (1, 3), (971, 33)])
def test_from_tensors_checks_the_index_in_full(n, k):
    packed = pack_dense(_sparse(n, k, 0.5))
    PackedWeight.from_tensors(packed.tensors(), n, k, check=True)  # a packer's index passes
    if packed.offsets.numel() > 1:
        bad = dict(packed.tensors(), offsets=packed.offsets.clone())
        bad["offsets"].view(-1)[-1] += 1000  # a column that would read past the values
        PackedWeight.from_tensors(bad, n, k)  # unchecked: shapes only (the per-forward rebuild)
        with pytest.raises(ValueError, match="prefix sum"):
            PackedWeight.from_tensors(bad, n, k, check=True)
    short = dict(packed.tensors(), values=packed.values[:-1].clone())
    with pytest.raises(ValueError, match="values must have"):
        PackedWeight.from_tensors(short, n, k, check=True)


def test_from_tensors_refuses_bits_past_the_last_row():
    packed = pack_dense(_sparse(200, 8, 0.5))  # the last block holds 72 of 128 rows
    bitmap = packed.bitmap.clone()
    bitmap[-1, -1, 3] |= 1  # row 96 of the last block (row 224 > N), in the last column: offsets stay valid
    bad = {"bitmap": bitmap, "offsets": packed.offsets, "values": torch.cat([packed.values, packed.values[:1]])}
    with pytest.raises(ValueError, match="rows past N"):
        PackedWeight.from_tensors(bad, 200, 8, check=True)
