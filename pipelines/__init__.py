"""The pipeline runner and packaged pipeline YAMLs, imported as ``samadapt.pipelines``."""
