"""Pictures of an analysis and of a pruning run: the Hessian block matrix
(:mod:`~oba_fx.pictures.blocks`), the coupled dataflow (:mod:`~oba_fx.pictures.dataflow`)
and what was removed (:mod:`~oba_fx.pictures.removed`). Each returns its data (for tests and
scripts) and draws it with matplotlib only.
"""

from .blocks import BlockMatrix, block_matrix, block_rows, draw_block_matrix, write_block_csv

__all__ = ["BlockMatrix", "block_matrix", "block_rows", "draw_block_matrix", "write_block_csv"]
