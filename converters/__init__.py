"""Verified ResNet checkpoint conversion: read any supported layout, write Detectron2,
MMSegmentation or torchvision files, and prove each output loads into its real consumer.

    from converters import load_backbone, build_resnet, to_detectron2
    bb = load_backbone("ckpt.pth")          # Backbone(arch, state_dict, layout, meta)
    model = build_resnet(bb)                # torchvision ResNet, fc = Identity, strict load
    to_detectron2(bb, "r50.pkl")            # writes, checks keys, verifies in Detectron2

Detectron2 and MMSegmentation are imported only inside the verification functions. No file's
pickled code runs unless allow_pickle=True and the file needs it (converters.reader).
"""
from converters.formats import detectron2_settings
from converters.loader import Backbone, build_resnet, load_backbone
from converters.reader import read_checkpoint
from converters.writers import to_detectron2, to_mmseg, to_torchvision

__all__ = ["Backbone", "load_backbone", "build_resnet", "read_checkpoint", "to_detectron2", "to_mmseg",
           "to_torchvision", "detectron2_settings"]
