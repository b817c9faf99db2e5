"""Use the trained model: export it in standard formats, classify new images."""
