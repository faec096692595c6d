"""Glow (Kingma & Dhariwal, 2018), the engine's first model: GlowConfig (`config.py`) beside Glow (`model.py`),
its layers (`layers/`) and the latent-space tools (`latents.py`)."""
