"""dazoo's networks: RegistrationNet, SegmentationNet and the joint DeepAtlas model."""
