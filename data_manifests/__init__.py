"""Packaged manifests of the demo data, imported as ``samadapt.data_manifests`` (``data=demo:brain``)."""
