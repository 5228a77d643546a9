"""Adaptive Hybrid-PEFT Mamba: Mamba-1 language models that adapt their scan order, masks and adapters while
they train. Importing this package has no side effects (no kernel builds, no env or CLI reads)."""
from adaptive_mamba.config import AdaptiveMambaConfig
from adaptive_mamba.model import AdaptiveMambaForCausalLM, CausalLMOutput, LayerState, MambaCache

__all__ = ["AdaptiveMambaConfig", "AdaptiveMambaForCausalLM", "CausalLMOutput", "LayerState", "MambaCache"]
__version__ = "0.1.0"
