"""echoclip_jax: EchoCLIP-style echocardiography CLIP training in JAX/Flax."""
