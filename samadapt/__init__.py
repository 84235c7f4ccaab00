"""samadapt: domain-adapt Segment Anything to MRI/CT."""
__version__ = "0.1.0"
