"""Datasets (ImageFolder, Fashion-MNIST IDX, COCO-format detection) and transforms built on timm."""
