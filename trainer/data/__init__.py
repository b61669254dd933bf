"""Datasets over tile stores and image folders, splits, samplers, augmentations (docs/data.md)."""

from trainer.data.collate import collate_samples
from trainer.data.image_folder import ImageFolderDataset, make_tiny_image_folder
from trainer.data.labels import NO_LABEL, UnknownLabelError, build_label_map, encode_label
from trainer.data.multi_store import StoreUnion
from trainer.data.precrop import precrop_indices
from trainer.data.samplers import SlideSampler
from trainer.data.splits import assign_splits, by_slide, kfold, split_groups
from trainer.data.tile_dataset import TileStoreDataset, collate_slide

__all__ = [
    "NO_LABEL",
    "ImageFolderDataset",
    "SlideSampler",
    "StoreUnion",
    "TileStoreDataset",
    "UnknownLabelError",
    "assign_splits",
    "by_slide",
    "build_label_map",
    "collate_samples",
    "collate_slide",
    "encode_label",
    "kfold",
    "make_tiny_image_folder",
    "precrop_indices",
    "split_groups",
]
