"""packbits / segment_packbits against a plain-Python bit packing (CPU; the same ops run on any device)."""

from __future__ import annotations

import pytest
import torch

import flashinfer


def _pack_py(bits, bitorder):
    out = []
    for i in range(0, len(bits), 8):
        chunk = bits[i : i + 8] + [0] * (8 - len(bits[i : i + 8]))
        val = 0
        for b, x in enumerate(chunk):
            if x:
                val |= (1 << b) if bitorder == "little" else (1 << (7 - b))
        out.append(val)
    return out


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000])
@pytest.mark.parametrize("bitorder", ["little", "big"])
def test_packbits_matches_reference(n, bitorder):
    x = torch.rand(n) < 0.5
    got = flashinfer.packbits(x, bitorder=bitorder)
    assert got.dtype == torch.uint8 and got.numel() == (n + 7) // 8
    assert got.tolist() == _pack_py([int(b) for b in x.tolist()], bitorder)


def test_packbits_flattens_and_treats_nonzero_as_one():
    x = torch.tensor([[0, 2, 0], [5, 0, 0], [0, 0, 1]], dtype=torch.int32)
    assert flashinfer.packbits(x, bitorder="little").tolist() == [0b00001010, 0b1]


@pytest.mark.parametrize("bitorder", ["little", "big"])
def test_segment_packbits_pads_each_segment(bitorder):
    lens = [5, 0, 17, 8, 1]
    indptr = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    x = torch.rand(int(indptr[-1])) < 0.5
    packed, pindptr = flashinfer.segment_packbits(x, indptr, bitorder=bitorder)
    assert pindptr.dtype == torch.int32
    expect, offs = [], [0]
    for i in range(len(lens)):
        seg = [int(b) for b in x[indptr[i] : indptr[i + 1]].tolist()]
        expect += _pack_py(seg, bitorder)
        offs.append(len(expect))
    assert packed.tolist() == expect and pindptr.tolist() == offs


def test_bad_arguments():
    with pytest.raises(ValueError, match="bitorder"):
        flashinfer.packbits(torch.ones(3, dtype=torch.bool), bitorder="middle")
    with pytest.raises(ValueError, match="non-decreasing"):
        flashinfer.segment_packbits(torch.ones(3, dtype=torch.bool), torch.tensor([0, 2, 1]))
    with pytest.raises(TypeError, match="int32"):
        flashinfer.segment_packbits(torch.ones(3, dtype=torch.bool), torch.tensor([0.0, 3.0]))
