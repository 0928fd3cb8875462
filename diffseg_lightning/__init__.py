"""DiffSeg: diffusion models for medical image segmentation."""
