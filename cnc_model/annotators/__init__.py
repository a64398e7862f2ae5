"""The models that annotate source images into triplets: saliency (U2-Net), depth, inpainting,
CLIP image embeddings and VAE latents. Each loads from a preset and runs on batches of arrays."""
