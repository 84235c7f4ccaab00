"""``samadapt baseline``: a MONAI 2D U-Net trained on the same slices as ``finetune`` (the bar SAM has to clear)."""
