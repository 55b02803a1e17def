"""raylm dataprep: a text corpus → SentencePiece tokens packed into fixed-length Arrow shards (see DESIGN)."""

from raylm.dataset import PackedDataset, open_dataset

__all__ = ["PackedDataset", "open_dataset"]
