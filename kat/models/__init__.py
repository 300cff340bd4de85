"""KAT models for timm. Importing this package registers kat_{tiny,small,base}[_patch16_224] with timm."""

from kat.models.from_vit import kat_from_vit, load_weights_except_head
from kat.models.kat import FusedKatBlock, KANMlp, Kat, init_mimetic_attention
from kat.models.pretrained import CheckpointMismatchError, checkpoint_filter_fn, load_checkpoint_file

__all__ = [
    "CheckpointMismatchError",
    "FusedKatBlock",
    "KANMlp",
    "Kat",
    "checkpoint_filter_fn",
    "init_mimetic_attention",
    "kat_from_vit",
    "load_checkpoint_file",
    "load_weights_except_head",
]
