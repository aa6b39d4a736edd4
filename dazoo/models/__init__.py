"""dazoo's networks: RegistrationNet, SegmentationNet and the joint DeepAtlas model.

Importing this package registers every dazoo Keras class (models, layers, losses), so that
``keras.saving.load_model`` can read dazoo ``.keras`` files without ``custom_objects``.
"""
from dazoo.models.deep_atlas import DeepAtlas
from dazoo.models.registration import RegistrationNet, load_voxelmorph_weights
from dazoo.models.segmentation import SegmentationNet
from dazoo.models.widen import widen

__all__ = ["DeepAtlas", "RegistrationNet", "SegmentationNet", "load_voxelmorph_weights", "widen"]
