"""The pretrain stage, imported as ``samadapt.pretrain``: config, MAE around SAM's encoder, ``run``."""
