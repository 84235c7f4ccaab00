"""The finetune stage, imported as ``samadapt.finetune``: config, embedding cache, ``run`` (models: samadapt.models)."""
