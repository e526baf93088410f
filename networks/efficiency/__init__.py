"""What makes a frozen backbone cheap to train, attached to a built network the way tuning methods are:
frozen blocks in bfloat16 and recomputed (``frozen_blocks``), the hand-written backward of frozen Swin blocks
(``frozen_swin``), the Swin-Unet head in chunks (``fused_head``), SwinUNETR's leaner residual blocks (``unet_blocks``).
The backbones do not import this package."""
