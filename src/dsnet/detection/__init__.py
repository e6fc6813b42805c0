"""DS-FPN neck and torchvision detector builders (RetinaNet, Mask R-CNN)."""
