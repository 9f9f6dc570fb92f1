"""Scoring segmentations against ground truth: metrics, tumour detection, and the reports of ``clipseg3d evaluate``."""
