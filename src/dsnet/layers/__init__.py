"""Small reusable blocks that timm.layers does not have. Never imports dsnet.models."""
