"""nnU-Net-style preprocessing (conversion, verification, planning, preprocessing, inverse).

The pipeline is built under its own issue; this package reserves the layout the bundles import from.
"""
