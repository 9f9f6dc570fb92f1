"""`make bench-claims`: the paper's claims measured on CT phantoms, written to BENCHMARKS.md.

Six partially labelled phantom datasets (``clipseg3d.phantom``'s ``datasets.yaml``, three scanner
sites) train one universal model and six specialists (the same U-Net with a plain 1x1x1 conv head
over each dataset's classes, their steps summing to the universal model's). The universal model
is then scored against the specialists on held-out fully labelled phantoms of the training sites
and of an unseen site, fine-tuned on a new task, and timed: dynamic head against backbone, the
sliding window against MONAI's, a training step against the bare backbone.
"""
