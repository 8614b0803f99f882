import pickle

import numpy as np
import pytest

from chipflow.grid import Block, ChipGrid, EdgePolicy, chip_offsets, plan_blocks


@pytest.mark.parametrize(
    "size,tile,stride,edge,expected",
    [
        (1024, 256, 256, EdgePolicy.DROP, [0, 256, 512, 768]),
        (1024, 256, 128, EdgePolicy.DROP, [0, 128, 256, 384, 512, 640, 768]),
        (1000, 256, 256, EdgePolicy.DROP, [0, 256, 512]),
        (1000, 256, 256, EdgePolicy.PAD, [0, 256, 512, 768]),
        (1000, 256, 256, EdgePolicy.SHIFT, [0, 256, 512, 744]),
        (256, 256, 100, EdgePolicy.SHIFT, [0]),
        (100, 256, 256, EdgePolicy.PAD, [0]),
        (100, 256, 256, EdgePolicy.DROP, []),
        (1000, 200, 300, EdgePolicy.DROP, [0, 300, 600]),  # stride > tile: gaps
    ],
)
def test_chip_offsets(size, tile, stride, edge, expected):
    assert chip_offsets(size=size, tile=tile, stride=stride, edge=edge).tolist() == expected


@pytest.mark.parametrize("edge", list(EdgePolicy))
@pytest.mark.parametrize("size", [256, 300, 1000, 4096 + 77])
def test_offsets_cover_the_raster_as_documented(edge, size):
    off = chip_offsets(size=size, tile=256, stride=128, edge=edge)
    if edge is EdgePolicy.DROP:
        assert len(off) == (size - 256) // 128 + 1 and off[-1] + 256 <= size
    else:
        assert off[-1] + 256 >= size
        assert len(off) == -(-(size - 256) // 128) + 1
    if edge is EdgePolicy.SHIFT:
        assert off[-1] + 256 == size


@pytest.mark.parametrize("shape", [(1024, 1024), (3000, 700), (256, 256), (9000, 5000)])
@pytest.mark.parametrize("stride", [128, 256, 100])
def test_blocks_partition_the_chip_grid(shape, stride):
    grid = ChipGrid(shape[1], shape[0], 256, 256, stride, stride)
    blocks = plan_blocks(grid, align=(512, 512))
    seen = np.zeros((grid.n_rows, grid.n_cols), int)
    for b in blocks:
        seen[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += 1
        x0, y0, x1, y1 = b.window
        assert x0 == grid.xs[b.cols[0]] and x1 == grid.xs[b.cols[1] - 1] + 256
        assert y0 == grid.ys[b.rows[0]] and y1 == grid.ys[b.rows[1] - 1] + 256
        assert x1 - x0 <= 2048 and y1 - y0 <= 2048
    assert (seen == 1).all()
    assert [b.id for b in blocks] == list(range(len(blocks)))


def test_block_steps_align_to_the_files_internal_tiles():
    grid = ChipGrid(16384, 16384, 256, 256, 128, 128)
    for b in plan_blocks(grid, align=(512, 512)):
        assert b.window[0] % 512 == 0 and b.window[1] % 512 == 0


def test_chip_ids_depend_only_on_grid_position():
    grid = ChipGrid(1024, 768, 256, 256, 128, 128)
    assert grid.n_cols == 7 and grid.n_rows == 5
    assert grid.chip_id(2, 3) == 17


def test_plan_values_pickle_round_trip():
    grid = ChipGrid(1000, 1000, 256, 256, 128, 128, EdgePolicy.SHIFT)
    blocks = plan_blocks(grid)
    assert pickle.loads(pickle.dumps(grid)) == grid
    assert pickle.loads(pickle.dumps(blocks)) == blocks
    assert isinstance(blocks[0], Block)
