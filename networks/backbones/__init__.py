"""Backbones pretrained on natural images, written with timm's parameter names: ViT and Swin, and their layers."""
