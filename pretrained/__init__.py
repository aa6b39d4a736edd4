"""Pretrained dazoo presets (one folder per preset), installed as package data."""
